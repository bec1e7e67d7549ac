"""SAE training: dictionary kinds from a registry (``dictionaries``: ReLU, TopK, BatchTopK, JumpReLU;
SAEs, transcoders, crosscoders), fused sweeps, checkpoints with exact resume, eval, SAELens interop."""

from . import dictionaries
from .config import SAEConfig, SourceConfig, load_sweep
from .dictionaries import Dictionary
from .store import METRIC_DEFINITIONS, SAEStore
from .trainer import Trainer


def train(lake: str, saes: list[SAEConfig], progress: bool = True, resume: bool = False, **source) -> list[dict]:
    """Train SAEs over one source: ``train(lake, [SAEConfig(hooks=[...], arch="topk", k=16, name="s1")],
    run="r1", tokens=100_000, batch_size=1024)``; returns the final configs."""
    return Trainer(SourceConfig(lake=lake, **source), saes, resume=resume, progress=progress).run()


def load_sae(lake: str, name: str, device: str = "cpu"):
    """(the dictionary, taking raw activations; its config) of a trained SAE."""
    return SAEStore(lake).load(name, device)


__all__ = [
    "METRIC_DEFINITIONS",
    "Dictionary",
    "SAEConfig",
    "SAEStore",
    "SourceConfig",
    "Trainer",
    "dictionaries",
    "load_sae",
    "load_sweep",
    "train",
]
