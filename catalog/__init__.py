"""saelake's DuckDB catalog: an index over the lake's manifests (rebuildable, never the source of truth)."""

from .db import SAE_COLUMNS, Catalog, CatalogError, check_select

__all__ = ["SAE_COLUMNS", "Catalog", "CatalogError", "check_select"]
