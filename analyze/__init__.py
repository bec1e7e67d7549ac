"""saelake analysis: per-feature statistics and samples of SAEs, and the feature stores.

from saelake.analyze import AnalyzeConfig, analyze
rec = analyze(AnalyzeConfig(lake="./lake", sae="my-sae"))          # embedded store
rec = analyze(AnalyzeConfig(lake="./lake", sae="my-sae", store="mongodb://127.0.0.1:27017/x"))
"""

from .interventions import Edit, Splice, generate
from .run import AnalyzeConfig, analyze
from .stats import FeatureStats
from .stores import EmbeddedStore, FeatureStore, MongoStore, open_store
from .view import show_feature

__all__ = [
    "AnalyzeConfig",
    "Edit",
    "EmbeddedStore",
    "FeatureStats",
    "FeatureStore",
    "MongoStore",
    "Splice",
    "analyze",
    "generate",
    "open_store",
    "show_feature",
]
