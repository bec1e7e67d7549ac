"""saelake's activation lake: models, corpora, ingest, and the shared reader interface."""

import os

os.environ.setdefault("LANCE_LOG", "error")  # Lance warns on every first write to a new dataset
# OpenMP threads that spin while waiting make small ops up to 100x slower on busy cores (before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from .corpus import documents, pack_contexts
from .errors import UserError
from .ingest import IngestConfig, ingest
from .lake import Lake
from .live import LiveSource
from .models import LoadedModel, load_model
from .readers import ActivationSource, ContextBatch, SnapshotSource, TokenBatch

__all__ = [
    "ActivationSource",
    "ContextBatch",
    "IngestConfig",
    "Lake",
    "LiveSource",
    "LoadedModel",
    "SnapshotSource",
    "TokenBatch",
    "UserError",
    "documents",
    "ingest",
    "load_model",
    "pack_contexts",
]
