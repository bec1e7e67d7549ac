"""Training settings: one ``SAEConfig`` per SAE, one ``SourceConfig`` per training pass.

A sweep file (TOML) has source keys and SAE defaults at the top level and one ``[[sae]]``
table per SAE. ``lake train`` without ``--config`` is a sweep of one.

``SAEConfig`` holds the keys every kind has (``BaseSAEConfig``) plus the keys of every registered
dictionary kind (its ``Options``, ``train/dictionaries/``): a kind's key is None until ``resolve``
fills it from the kind's defaults, and stays None in SAEs of kinds that do not have it. Every
default lives in one place: here for the common keys, in the kind's ``Options`` for its keys; the
CLI's help reads them from there.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from saelake.lake import IngestConfig, UserError
from saelake.lake.hooknames import expand_hooks

from . import dictionaries
from .dictionaries.base import fraction, option, option_help

NORMALIZE = ("dataset", "none")  # the values of ``normalize``
B_DEC_INIT = ("mean", "median", "zeros")  # the values of ``b_dec_init``
DEFAULT_EXPANSION = 8  # d_sae = expansion x d_in when neither is given
LR_D_SAE = 2**14  # default lr: the kind's ``lr_base`` at d_sae = LR_D_SAE, ~1/sqrt(d_sae) (sparsify's rule)
DEAD_WINDOW_MAX, DEAD_WINDOW_FRACTION = 1_000_000, 4  # default dead window: min(max, tokens / fraction)


def default_lr(d_sae: int, base: float) -> float:
    return base / (d_sae / LR_D_SAE) ** 0.5


def _lr_help() -> str:
    bases: dict[float, list[str]] = {}
    for kind in dictionaries.kinds():
        bases.setdefault(kind.lr_base, []).append(kind.name)
    return "; ".join(f"{', '.join(names)}: {b:g}" for b, names in bases.items()) + f", x 1/sqrt(d_sae/{LR_D_SAE})"


def default_dead_window(tokens: int, batch_size: int) -> int:
    return int(min(DEAD_WINDOW_MAX, max(batch_size, tokens // DEAD_WINDOW_FRACTION)))


@dataclass
class BaseSAEConfig:
    """The keys of every SAE. ``hooks``/``out_hooks``: several hooks = a crosscoder; out_hooks ≠ hooks = a
    transcoder."""

    hooks: list[str]
    arch: str = option("topk", "Dictionary kind")
    name: str | None = None
    out_hooks: list[str] | None = None
    expansion: float | None = option(None, "d_sae = expansion x d_in", str(DEFAULT_EXPANSION))
    d_sae: int | None = option(None, "Latents (instead of --expansion)")
    lr: float | None = option(None, "Adam learning rate", _lr_help())
    lr_warmup: float = option(0.02, "Fraction of the steps with a linear learning-rate warm-up")
    lr_decay: float = option(0.2, "Final fraction of the steps with a linear learning-rate decay to 0")
    dead_window: int | None = option(
        None,
        "Tokens without activation after which a latent is dead",
        f"min({DEAD_WINDOW_MAX:,}, tokens/{DEAD_WINDOW_FRACTION})",
    )
    normalize_decoder: bool | None = option(None, "Unit-norm decoder rows after each step", "the kind's")
    normalize: str = option("dataset", "'dataset': scale each hook so E|x| = sqrt(d) (ingest stats); 'none'")
    outlier_factor: float | None = option(
        10.0, "Drop tokens with norm above this x the hook's median norm; 0 keeps all"
    )
    b_dec_init: str = option("mean", "Decoder bias init: mean, median (per dim, of the first batch) or zeros")
    seed: int = option(0, "Weight initialisation seed")

    @property
    def all_out_hooks(self) -> list[str]:
        return self.out_hooks or self.hooks

    @property
    def kind(self) -> type[dictionaries.Dictionary]:
        return dictionaries.get(self.arch)

    def _kind(self) -> type[dictionaries.Dictionary]:
        try:
            return self.kind
        except UserError:
            raise UserError(
                f"SAE {self.name}: unknown arch {self.arch!r}: use one of {', '.join(dictionaries.names())}"
            ) from None

    def __post_init__(self):
        self.hooks = expand_hooks(self.hooks)
        self.out_hooks = expand_hooks(self.out_hooks) if self.out_hooks else self.out_hooks

    def resolve(self, d_model: dict[str, int], tokens: int, batch_size: int, model: str | None = None) -> SAEConfig:
        """Fill defaults that depend on the source (its hooks' widths, ``model`` its model's spec when
        known) and the kind; check values. Returns self."""
        where = f"SAE {self.name}"
        for h in self.hooks + (self.out_hooks or []):
            if h not in d_model:
                raise UserError(f"{where}: hook {h!r} is not in the source: it has {', '.join(d_model)}")
        kind = self._kind()
        d_in = sum(d_model[h] for h in self.hooks)
        opts = self._given_options(kind)
        if self.d_sae is None:
            e = DEFAULT_EXPANSION if self.expansion is None else self.expansion
            if e <= 0:
                raise UserError(f"{where}: expansion must be positive, got {e}")
            self.d_sae = opts.latents() or int(round(e * d_in))
        if self.d_sae <= 0:
            raise UserError(f"{where}: d_sae must be positive, got {self.d_sae}")
        opts.resolve(d_in, self.d_sae, where)
        kind.resolve_shape(opts, self.hooks, self.all_out_hooks, d_model, self.d_sae, where, model)
        for key, value in asdict(opts).items():
            setattr(self, key, value)
        if self.lr is None:
            self.lr = default_lr(self.d_sae, kind.lr_base)
        if self.lr <= 0:
            raise UserError(f"{where}: lr must be positive, got {self.lr}")
        if self.dead_window is None:
            self.dead_window = default_dead_window(tokens, batch_size)
        if self.normalize_decoder is None:
            self.normalize_decoder = kind.unit_norm_decoder
        if self.normalize not in NORMALIZE:
            raise UserError(f"{where}: normalize must be 'dataset' or 'none', got {self.normalize!r}")
        if self.outlier_factor == 0:
            self.outlier_factor = None  # keep every token
        if self.outlier_factor is not None and self.outlier_factor <= 1:
            raise UserError(f"{where}: outlier_factor must be > 1 (or 0: keep all), got {self.outlier_factor}")
        if self.b_dec_init not in B_DEC_INIT:
            raise UserError(f"{where}: b_dec_init must be mean, median or zeros")
        for f in ("lr_warmup", "lr_decay"):
            fraction(getattr(self, f), f, where)
        return self

    def _given_options(self, kind) -> dictionaries.Options:
        """The kind's options as given (None: its default). Keys of other kinds are dropped (set to
        None): a sweep's defaults may set keys for some of its kinds only."""
        own = {f.name for f in fields(kind.Options)}
        for key in KIND_KEYS:
            if key not in own:
                setattr(self, key, None)
        return kind.Options(**{k: getattr(self, k) for k in own if getattr(self, k) is not None})

    def options(self) -> dictionaries.Options:
        """The kind's options of a resolved config."""
        return self.kind.Options(**{f.name: getattr(self, f.name) for f in fields(self.kind.Options)})

    def group_key(self) -> tuple:
        """SAEs with equal keys are stacked and stepped together (lr, seed and the kind's stackable keys may differ)."""
        d = asdict(self)
        for f in ("name", "lr", "seed", "expansion", *self.kind.stackable):
            d.pop(f)
        return tuple(sorted((k, str(v)) for k, v in d.items()))


def type_name(typ) -> str:
    """A field's type as written (``int``, ``float | None``): modules with or without postponed annotations."""
    return typ if isinstance(typ, str) else getattr(typ, "__name__", None) or str(typ)


def _kind_keys() -> dict[str, str]:
    """Every registered kind's keys -> their type (without None), once each; kinds that share a key
    must agree on its type."""
    out: dict[str, str] = {}
    for kind in dictionaries.kinds():
        for f in fields(kind.Options):
            typ = type_name(f.type).replace(" | None", "")
            if out.setdefault(f.name, typ) != typ:
                raise TypeError(f"kinds disagree on the type of option {f.name!r}: {out[f.name]} vs {typ}")
    return out


KIND_KEYS = _kind_keys()
SAEConfig = dataclasses.make_dataclass(
    "SAEConfig",
    [(k, f"{t} | None", dataclasses.field(default=None)) for k, t in KIND_KEYS.items()],
    bases=(BaseSAEConfig,),
)
SAEConfig.__module__ = __name__
SAEConfig.__doc__ = BaseSAEConfig.__doc__ + " Kind keys: " + ", ".join(KIND_KEYS) + "."


def kind_key_help(key: str) -> str:
    """Help of a kind's key: which kinds have it, and each one's default."""
    owners = [k for k in dictionaries.kinds() if key in {f.name for f in fields(k.Options)}]
    per_kind = {}
    for k in owners:
        f = next(f for f in fields(k.Options) if f.name == key)
        per_kind.setdefault(option_help(f), []).append(k.name)
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in per_kind.items())


def common_key_help(key: str, cls=BaseSAEConfig) -> str:
    return option_help(next(f for f in fields(cls) if f.name == key))


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
    context_size: int = next(f.default for f in fields(IngestConfig) if f.name == "context_size")  # as ingest
    tokens: int = 1_000_000
    batch_size: int = 4096
    repeat: bool = False  # snapshot: loop over it when tokens > its rows
    data_seed: int = 0
    holdout: int | None = None  # tokens held out for the final metrics (None: holdout.py's default; 0: none)
    device: str = "cpu"
    autocast: str | None = None  # "bf16"
    checkpoint_every: int | None = None  # steps (default: 5 checkpoints per run)
    log_every: int | None = None  # steps (default: about 100 points per run)
    name: str | None = None  # sweep: name prefix
    parallel: str | None = None  # under torchrun: "data" (replicas, grads all-reduced) or "sweep" (SAEs split)

    def __post_init__(self):
        check_device(self.device)


def check_device(device: str) -> None:
    """A device torch can use here, or a UserError that says which ones it can."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {device!r} is not a device torch knows: use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        torch.ones(1, device=dev).add(1).cpu()  # compute there, and read the result back
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        raise UserError(
            f"--device {device}: torch cannot use it here ({str(e).splitlines()[0][:120]}); use --device cpu"
        ) from None


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
    if "list[int]" in t:
        return int_list(value, f"{where}: key {key!r}")
    if t.startswith("int") and not (isinstance(value, int) and not isinstance(value, bool)):
        raise UserError(f"{where}: key {key!r} must be an integer, got {type(value).__name__} {value!r}")
    if t.startswith("float") and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise UserError(f"{where}: key {key!r} must be a number, got {type(value).__name__} {value!r}")
    if t.startswith("bool") and not isinstance(value, bool):
        raise UserError(f"{where}: key {key!r} must be true or false, got {type(value).__name__} {value!r}")
    if t.startswith("str") and not isinstance(value, str):
        raise UserError(f"{where}: key {key!r} must be a string, got {type(value).__name__} {value!r}")
    return float(value) if t.startswith("float") else value


def int_list(value, where: str) -> list[int]:
    """A list of integers given as a list or as "P1,P2,..." (command line, TOML string)."""
    if isinstance(value, str):
        try:
            return [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"{where} must be integers separated by commas, got {value!r}") from None
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    raise UserError(f"{where} must be a list of integers, got {value!r}")


def load_sweep(path: str | Path, lake: str, overrides: dict | None = None) -> tuple[SourceConfig, list[SAEConfig]]:
    """Parse a sweep TOML file; every error names the entry and key."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"sweep file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"sweep file {path} is a folder: give a TOML file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (a sweep file is TOML, UTF-8)") from None
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
            raise UserError(
                f"{path} (top level): unknown key {key!r}; known: {', '.join(sorted(set(SOURCE_KEYS) | set(SAE_KEYS)))}"
            )
    source.update({k: v for k, v in (overrides or {}).items() if v is not None})
    saes = []
    for i, entry in enumerate(entries, 1):
        where = f"{path} [[sae]] entry {i}" + (f" ({entry['name']})" if isinstance(entry.get("name"), str) else "")
        values = {}
        for key, value in entry.items():
            key = ALIASES.get(key, key)
            if key in SOURCE_KEYS and key != "name":
                raise UserError(f"{where}: key {key!r} is shared by the whole sweep: move it to the top level")
            if key not in SAE_KEYS:
                raise UserError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(SAE_KEYS))}")
            values[key] = _check_type(where, key, value, SAE_KEYS[key])
        arch = values.get("arch", defaults.get("arch", BaseSAEConfig.arch))
        if arch not in dictionaries.names():
            raise UserError(f"{where}: unknown arch {arch!r}: use one of {', '.join(dictionaries.names())}")
        own = {f.name for f in fields(dictionaries.get(arch).Options)}
        for key in values:
            if key in KIND_KEYS and key not in own:
                raise UserError(
                    f"{where}: key {key!r} does not apply to arch {arch!r} (its keys: "
                    f"{', '.join(sorted(own)) or 'none'})"
                )
        # top-level defaults of kind keys apply to the entries whose kind has them
        values = {k: v for k, v in defaults.items() if k not in KIND_KEYS or k in own} | values
        if "hooks" not in values:
            raise UserError(f'{where}: no hook: set `hook = "..."` at the top level or in the entry')
        if "name" not in values or values["name"] == defaults.get("name"):
            values["name"] = f"{source.get('name') or path.stem}-{i}"
        saes.append(SAEConfig(**values))
    return SourceConfig(**source), saes
