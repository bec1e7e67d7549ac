"""Typed records the lake keeps as JSON: a run's manifest (with its snapshots) and an analysis record.

Each record is a small dataclass with a ``schema_version``. ``Record.from_json(data, where)``
is the one way in: it checks every key's type against the dataclass and raises a one-line
``UserError`` naming the file (``where``) and the key; ``to_json()`` is the one way out and
checks the same way, so nothing malformed is ever written.

Schema versions: 1 is what saelake wrote before records carried a version (commit 0097db9
and earlier: no ``schema_version`` key); such records read as version 1 with the later keys'
defaults. A record from a newer saelake (a higher version) is refused with a message, not guessed at.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from .errors import UserError

_KINDS = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    bool: ("true/false", "true/false values"),
}


def _kind(typ, plural: bool = False) -> str:
    """How a type reads in an error message."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _kind(a, plural) for a in args)
    if origin is list:
        return ("lists" if plural else "a list") + f" of {_kind(args[0], True)}"
    if origin is dict:
        return ("objects" if plural else "an object") + f" of {_kind(args[1], True)}"
    if dataclasses.is_dataclass(typ):
        return "objects" if plural else "an object"
    return _KINDS[typ][plural] if typ in _KINDS else str(typ)


def _scalar_ok(value, typ) -> bool:
    if typ in (int, float) and isinstance(value, bool):  # JSON true is no number
        return False
    return isinstance(value, (int, float)) if typ is float else isinstance(value, typ)


def _convert(value, typ, where: str, key: str):
    """``value`` as ``typ`` (JSON numbers become float where a float is wanted), or a UserError."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    ok = True
    if typ is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]  # records use only `X | None`
        if inner not in _KINDS:  # a container: its own errors name the inner key
            return _convert(value, inner, where, key)
        ok = _scalar_ok(value, inner)
        value = float(value) if ok and inner is float else value
    elif dataclasses.is_dataclass(typ):
        return _build(typ, value, where, key + ".")
    elif origin is list:
        if isinstance(value, list):
            return [_convert(v, args[0], where, f"{key}[{i}]") for i, v in enumerate(value)]
        ok = False
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: _convert(v, args[1], where, f"{key}.{k}") for k, v in value.items()}
        ok = False
    else:
        ok = _scalar_ok(value, typ)
        value = float(value) if ok and typ is float else value
    if not ok:
        shown = repr(value)
        raise UserError(
            f"{where}: key {key!r} must be {_kind(typ)}, not {shown[:40]}" + ("..." if len(shown) > 40 else "")
        )
    return value


def _build(cls, data, where: str, prefix: str = ""):
    if not isinstance(data, dict):
        raise UserError(
            f"{where}: {('key ' + repr(prefix.rstrip('.'))) if prefix else 'the record'} must be a "
            f"JSON object, not {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key {prefix + unknown[0]!r} (not a key of {cls.__name__})")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], where, prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}: key {prefix + name!r} is missing")
    return cls(**values)


@dataclass
class Record:
    """Base of the versioned records: ``SCHEMA_VERSION`` is what this code writes."""

    SCHEMA_VERSION: ClassVar[int]

    @classmethod
    def from_json(cls, data, where: str) -> Self:
        if isinstance(data, dict):
            data = {"schema_version": 1, **data}  # records from before versions were recorded
            version = data["schema_version"]
            if isinstance(version, int) and version > cls.SCHEMA_VERSION:
                raise UserError(
                    f"{where}: schema_version {version} was written by a newer saelake (this one "
                    f"reads up to {cls.SCHEMA_VERSION}): upgrade saelake"
                )
        return _build(cls, data, where)

    def to_json(self) -> dict:
        """The JSON object to write (at this code's schema version), checked like a read one."""
        data = dataclasses.asdict(self) | {"schema_version": self.SCHEMA_VERSION}
        where = f"{type(self).__name__} {getattr(self, 'name', '')}".rstrip()
        return dataclasses.asdict(_build(type(self), data, where))


# -- runs ------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """A complete state of a run (what ``SnapshotSource(run, version)`` pins): per table its
    Lance version (tagged ``tag``) and row count."""

    tables: dict[str, int]
    rows: dict[str, int]
    contexts: int
    tokens: int
    tag: str
    created: str


@dataclass
class ModelInfo:
    n_layers: int
    d_model: int
    n_ctx: int
    d_vocab: int
    bos_token_id: int | None


@dataclass
class HookStats:
    """Norm statistics of one hook over a whole run (non-BOS tokens unless keep_bos)."""

    n: int
    mean_norm: float
    rms_norm: float
    p01_norm: float
    p05_norm: float
    median_norm: float
    p95_norm: float
    p99_norm: float
    p999_norm: float
    max_norm: float
    frac_over_10x_median: float


@dataclass
class RunManifest(Record):
    """``runs/<run>/manifest.json``: the source of truth for a run.

    ``checksums_from``: contexts committed before the run recorded content checksums: 0 when
    every data file has one, None for a run written before saelake recorded them (see
    lake/checksums.py). ``codecs`` (schema 3): each hook's storage codec, so int8/float8 runs are
    refused by older readers instead of misread."""

    SCHEMA_VERSION: ClassVar[int] = 3
    # identity: --resume and --append must repeat these (IDENTITY in ingest.py)
    model: str
    dataset: str
    text_column: str
    hooks: list[str]
    context_size: int
    dtype: str
    layouts: list[str]
    seed: int
    shuffle_buffer: int
    keep_bos: bool
    # state
    name: str
    status: str  # running | complete | failed
    created: str
    updated: str
    error: str | None
    model_info: ModelInfo
    columns: dict[str, str]  # hook -> Lance column name
    d_model: dict[str, int]  # hook -> width
    tables: list[str]
    contexts: int
    tokens: int
    rows_1d: int
    contexts_target: int
    segment_start: int
    versions: list[Snapshot]
    stats: dict[str, HookStats]
    checksums_from: int | None = None
    codecs: dict[str, str] | None = None  # hook -> storage codec (lake/codecs.py); None: ``dtype`` for all
    schema_version: int = 3

    def codec(self, hook: str) -> str:
        """The storage codec of ``hook``'s column (what the readers decode)."""
        return (self.codecs or {}).get(hook, self.dtype)

    def snapshot(self, version: int) -> Snapshot:
        """Snapshot ``version`` (1-based), or a UserError that says which exist."""
        if not self.versions:
            raise UserError(
                f"run {self.name!r} has no complete snapshot yet (status {self.status}): "
                f"finish it with `lake ingest --run {self.name} --resume ...`"
            )
        if not 1 <= version <= len(self.versions):
            raise UserError(f"run {self.name!r} has snapshot versions 1..{len(self.versions)}, not {version}")
        return self.versions[version - 1]


# -- analyses --------------------------------------------------------------------------------
@dataclass
class FileChecksum:
    """A data file's content checksum, and its size (what ``lake verify --quick`` compares)."""

    sha256: str
    bytes: int


@dataclass
class AnalysisRecord(Record):
    """``analyses/<name>/analysis.json`` (and the MongoDB ``analyses`` document, less its scalars).

    ``features_table``: the embedded store's table (a folder next to the record); None for
    MongoDB. ``checksums``: its data files (paths relative to the analysis folder); None in
    records written before saelake recorded them."""

    SCHEMA_VERSION: ClassVar[int] = 2
    name: str
    sae: str
    run: str | None
    version: int | None
    store: str
    n_features: int
    tokens: int
    tokens_total: int
    contexts: int
    context_size: int
    hook: str
    hooks: list[str]
    source: str  # snapshot | live
    model: str | None
    dataset: str | None
    created: str
    seconds: float
    tokens_per_second: float
    final_norm: str | None
    excluded_token_ids: list[int]
    status: str
    definitions: dict[str, str]
    config: dict[str, Any]  # the AnalyzeConfig it was made with
    features_table: str | None = None
    out_hooks: list[str] | None = None  # the SAE's out hooks (the order of each feature's decoder_norms)
    checksums: dict[str, FileChecksum] | None = None
    schema_version: int = 2


# -- latent indexes --------------------------------------------------------------------------
@dataclass
class LatentIndexRecord(Record):
    """``indexes/<name>/index.json``: an SAE's sparse codes over a snapshot (``lake encode``).

    The table ``latents.lance`` has one row per valid token (BOS excluded) of the snapshot's 2d
    table, in context order. ``contexts_done`` contexts are committed in Lance version
    ``lance_version``; a resumed encode drops anything a crash committed after it. ``checksums``:
    every data file of that version (keys ``latents.lance/data/<file>``)."""

    SCHEMA_VERSION: ClassVar[int] = 1
    name: str
    sae: str
    run: str
    version: int
    hooks: list[str]
    d_sae: int
    status: str  # running | complete
    contexts_done: int
    contexts_total: int
    tokens: int  # rows written
    entries: int  # non-zero latents written
    lance_version: int | None
    excluded_token_ids: list[int]
    checksums: dict[str, FileChecksum]
    created: str
    updated: str
    seconds: float = 0.0
    schema_version: int = 1
