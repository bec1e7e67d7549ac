"""Training settings: one ``SAEConfig`` per SAE, one ``SourceConfig`` per training pass.

A sweep file (TOML) has source keys and SAE defaults at the top level and one ``[[sae]]``
table per SAE. ``lake train`` without ``--config`` is a sweep of one.
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from saelake.lake import UserError

from .sae import ARCHS


@dataclass
class SAEConfig:
    """One SAE. ``hooks``/``out_hooks``: several hooks = a crosscoder; out_hooks ≠ hooks = a transcoder."""
    hooks: list[str]
    arch: str = "topk"
    name: str | None = None
    out_hooks: list[str] | None = None
    expansion: float | None = None  # d_sae = expansion · d_in (default 8 when d_sae is not given)
    d_sae: int | None = None
    k: int | None = None  # TopK/BatchTopK: latents per token (default 32, capped by d_sae)
    k_start: int | None = None  # k annealing: start at k_start, reach k after k_anneal of the steps
    k_anneal: float = 0.0
    l1: float | None = None  # sparsity coefficient: ReLU L1 (decoder-norm weighted), JumpReLU L0
    sparsity_warmup: float = 0.05  # fraction of steps over which the sparsity coefficient ramps up
    lr: float | None = None
    lr_warmup: float = 0.02  # fraction of steps, linear warm-up
    lr_decay: float = 0.2  # final fraction of steps, linear decay to 0
    aux_k: int | None = None  # AuxK: latents for the dead-latent auxiliary loss (default d_in/2)
    aux_coef: float = 1 / 32
    dead_window: int | None = None  # tokens without activation => dead (default min(1M, tokens/4))
    decoder_norm_topk: bool = False  # select top-k by pre-activation x decoder norm
    normalize_decoder: bool | None = None  # unit-norm decoder rows after each step (default: not relu)
    bandwidth: float = 0.05  # JumpReLU straight-through kernel width
    init_threshold: float = 1.0  # JumpReLU initial threshold, normalised units (pre-activations start ~N(0, 1))
    normalize: str = "dataset"  # "dataset": scale each hook so E|x| = sqrt(d) (from ingest stats); "none"
    outlier_factor: float | None = 10.0  # drop tokens with norm > factor x hook median norm; None keeps all
    b_dec_init: str = "mean"  # "mean", "median" (per dim, of the first batch) or "zeros"
    seed: int = 0  # weight initialisation

    @property
    def all_out_hooks(self) -> list[str]:
        return self.out_hooks or self.hooks

    def resolve(self, d_model: dict[str, int], tokens: int, batch_size: int) -> "SAEConfig":
        """Fill defaults that depend on the source; check values. Returns self."""
        for h in self.hooks + (self.out_hooks or []):
            if h not in d_model:
                raise UserError(f"SAE {self.name}: hook {h!r} is not in the source: it has {', '.join(d_model)}")
        if self.arch not in ARCHS:
            raise UserError(f"SAE {self.name}: unknown arch {self.arch!r}: use one of {', '.join(ARCHS)}")
        d_in = sum(d_model[h] for h in self.hooks)
        if self.d_sae is None:
            e = 8 if self.expansion is None else self.expansion
            if e <= 0:
                raise UserError(f"SAE {self.name}: expansion must be positive, got {e}")
            self.d_sae = int(round(e * d_in))
        if self.d_sae <= 0:
            raise UserError(f"SAE {self.name}: d_sae must be positive, got {self.d_sae}")
        if self.arch in ("topk", "batchtopk"):
            self.k = min(32, self.d_sae // 2) if self.k is None else self.k
            if not 0 < self.k < self.d_sae:
                raise UserError(f"SAE {self.name}: k must be in 1..d_sae-1 ({self.d_sae - 1}), got {self.k}")
            if self.k_start is not None and not self.k <= self.k_start <= self.d_sae:
                raise UserError(f"SAE {self.name}: k_start must be in k..d_sae, got {self.k_start}")
        else:
            self.k = None
        if self.l1 is None:
            self.l1 = {"relu": 5.0, "jumprelu": 1.0}.get(self.arch, 0.0)
        if self.lr is None:  # sparsify's rule of thumb, for normalised inputs
            self.lr = 2e-4 / (self.d_sae / 2 ** 14) ** 0.5
        if self.lr <= 0 or self.l1 < 0:
            raise UserError(f"SAE {self.name}: lr must be positive and l1 non-negative")
        if self.aux_k is None:
            self.aux_k = max(1, min(d_in // 2, self.d_sae // 2))
        if self.dead_window is None:
            self.dead_window = int(min(1_000_000, max(batch_size, tokens // 4)))
        if self.normalize_decoder is None:
            self.normalize_decoder = self.arch != "relu"
        if self.normalize not in ("dataset", "none"):
            raise UserError(f"SAE {self.name}: normalize must be 'dataset' or 'none', got {self.normalize!r}")
        if self.outlier_factor is not None and self.outlier_factor <= 1:
            raise UserError(f"SAE {self.name}: outlier_factor must be > 1 (or omitted), got {self.outlier_factor}")
        if self.b_dec_init not in ("mean", "median", "zeros"):
            raise UserError(f"SAE {self.name}: b_dec_init must be mean, median or zeros")
        for f in ("k_anneal", "sparsity_warmup", "lr_warmup", "lr_decay"):
            if not 0 <= getattr(self, f) <= 1:
                raise UserError(f"SAE {self.name}: {f} is a fraction of the steps (0..1), got {getattr(self, f)}")
        return self

    def group_key(self) -> tuple:
        """SAEs with equal keys are stacked and stepped together (k, lr, l1, seed may differ)."""
        d = asdict(self)
        for f in ("name", "k", "lr", "l1", "seed", "expansion"):
            d.pop(f)
        return tuple(sorted((k, str(v)) for k, v in d.items()))


@dataclass
class SourceConfig:
    """Where activations come from and how long to train: shared by every SAE of a sweep."""
    lake: str
    run: str | None = None  # snapshot source: run (+ version)
    version: int | None = None
    live: bool = False  # live source: model + dataset
    model: str | None = None
    dataset: str | None = None
    text_column: str = "text"
    context_size: int = 128
    tokens: int = 1_000_000
    batch_size: int = 4096
    repeat: bool = False  # snapshot: loop over it when tokens > its rows
    data_seed: int = 0
    device: str = "cpu"
    autocast: str | None = None  # "bf16"
    checkpoint_every: int | None = None  # steps (default: 5 checkpoints per run)
    log_every: int | None = None  # steps (default: about 100 points per run)
    name: str | None = None  # sweep: name prefix
    parallel: str | None = None  # under torchrun: "data" (replicas, grads all-reduced) or "sweep" (SAEs split)


SAE_KEYS = {f.name: f.type for f in fields(SAEConfig)}
SOURCE_KEYS = {f.name: f.type for f in fields(SourceConfig) if f.name not in ("lake",)}
ALIASES = {"hook": "hooks", "out_hook": "out_hooks"}


def _check_type(where: str, key: str, value, typ: str):
    t = str(typ)
    if "list[str]" in t:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise UserError(f"{where}: key {key!r} must be a hook name or a list of names, got {type(value).__name__}")
    if t.startswith("int") and not (isinstance(value, int) and not isinstance(value, bool)):
        raise UserError(f"{where}: key {key!r} must be an integer, got {type(value).__name__} {value!r}")
    if t.startswith("float") and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise UserError(f"{where}: key {key!r} must be a number, got {type(value).__name__} {value!r}")
    if t.startswith("bool") and not isinstance(value, bool):
        raise UserError(f"{where}: key {key!r} must be true or false, got {type(value).__name__} {value!r}")
    if t.startswith("str") and not isinstance(value, str):
        raise UserError(f"{where}: key {key!r} must be a string, got {type(value).__name__} {value!r}")
    return float(value) if t.startswith("float") else value


def load_sweep(path: str | Path, lake: str, overrides: dict | None = None) -> tuple[SourceConfig, list[SAEConfig]]:
    """Parse a sweep TOML file; every error names the entry and key."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"sweep file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    entries = doc.pop("sae", None)
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"{path}: no [[sae]] entries: add at least one [[sae]] table (arch, k, expansion...)")
    source, defaults = {"lake": lake}, {}
    for key, value in doc.items():
        key = ALIASES.get(key, key)
        if key in SOURCE_KEYS:
            source[key] = _check_type(f"{path} (top level)", key, value, SOURCE_KEYS[key])
        elif key in SAE_KEYS:
            defaults[key] = _check_type(f"{path} (top level)", key, value, SAE_KEYS[key])
        else:
            raise UserError(f"{path} (top level): unknown key {key!r}; known: "
                            f"{', '.join(sorted(set(SOURCE_KEYS) | set(SAE_KEYS)))}")
    source.update({k: v for k, v in (overrides or {}).items() if v is not None})
    saes = []
    for i, entry in enumerate(entries, 1):
        where = f"{path} [[sae]] entry {i}" + (f" ({entry['name']})" if isinstance(entry.get("name"), str) else "")
        values = dict(defaults)
        for key, value in entry.items():
            key = ALIASES.get(key, key)
            if key in SOURCE_KEYS and key != "name":
                raise UserError(f"{where}: key {key!r} is shared by the whole sweep: move it to the top level")
            if key not in SAE_KEYS:
                raise UserError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(SAE_KEYS))}")
            values[key] = _check_type(where, key, value, SAE_KEYS[key])
        if "hooks" not in values:
            raise UserError(f"{where}: no hook: set `hook = \"...\"` at the top level or in the entry")
        if "name" not in values or values["name"] == defaults.get("name"):
            values["name"] = f"{source.get('name') or path.stem}-{i}"
        saes.append(SAEConfig(**values))
    return SourceConfig(**source), saes
