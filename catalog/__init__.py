"""saelake's DuckDB catalog: an index over the lake's manifests (rebuildable, never the source of truth)."""

from .db import Catalog, CatalogError, check_select

__all__ = ["Catalog", "CatalogError", "check_select"]
