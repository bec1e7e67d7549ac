"""The SAE record: ``saes/<name>/config.json``, a typed ``Record`` (``saelake.lake.records``).

``read_sae_config(data, where)`` is the one way in (every key checked against its type; a problem
is one ``UserError`` line naming the file and the key) and ``sae_config_json(config, where)`` the
one way out (checked the same way, stamped with ``schema_version``). Schema versions: 1 is what
saelake wrote before records carried a version (commit 0097db9 and earlier); it reads as is.

Writers give the keys they know; keys they leave out are left out of the file too (readers treat
a missing key as None), so a config says what its writer knew: an imported SAE has no training
keys, a training one no ``imported_from``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from saelake.lake.records import Record


@dataclass
class SAERecord(Record):
    """One SAE: what it is (kind, shape, hooks), where it came from, how it was trained, its numbers."""

    SCHEMA_VERSION: ClassVar[int] = 2
    name: str
    arch: str  # the dictionary kind (train/dictionaries/)
    hooks: list[str]
    d_in: int
    d_sae: int
    status: str  # training | complete | imported
    out_hooks: list[str] | None = None  # None: the same as hooks
    hook: str | None = None  # hooks joined with ","
    out_hook: str | None = None
    d_out: int | None = None
    k: int | None = None
    run: str | None = None
    version: int | None = None
    model: str | None = None
    source: str | None = None  # snapshot | live
    dataset: str | None = None
    created: str | None = None
    updated: str | None = None
    apply_b_dec_to_input: bool | None = None
    hyperparameters: dict[str, Any] | None = None  # the resolved SAEConfig (imports: the kind's options)
    identity: dict[str, Any] | None = None  # keys a --resume must repeat
    training: dict[str, Any] | None = None
    normalization: dict[str, Any] | None = None
    bos_excluded: bool | None = None
    outlier_factor: float | None = None
    outlier_rule: str | None = None
    dead_window: int | None = None
    metric_definitions: dict[str, str] | None = None
    weights_sha256: str | None = None  # of weights.safetensors, checked on load
    # progress while training (heartbeat: saelake.lake.heartbeat)
    progress: dict[str, Any] | None = None
    heartbeat: str | None = None
    heartbeat_every_s: float | None = None
    pid: int | None = None
    pid_namespace: str | None = None
    # final numbers (in-sample, and on the held-out rows)
    tokens_trained: int | None = None
    tokens_dropped_outliers: int | None = None
    train_seconds: float | None = None
    tokens_per_second: float | None = None
    fvu: float | None = None
    l0: float | None = None
    dead_fraction: float | None = None
    explained_variance: float | None = None
    final_metrics: dict[str, Any] | None = None
    holdout: dict[str, Any] | None = None
    heldout_fvu: float | None = None
    heldout_l0: float | None = None
    heldout_dead_fraction: float | None = None
    eval: dict[str, Any] | None = None  # lake eval's result
    # imported SAEs
    imported_from: str | None = None
    import_format: str | None = None  # saelens | sparsify | llamascopium (train/interop/)
    source_cfg: dict[str, Any] | None = None  # the source's own config, as read
    saelens_cfg: dict[str, Any] | None = None
    schema_version: int = 2

    @property
    def all_out_hooks(self) -> list[str]:
        return self.out_hooks or self.hooks


def read_sae_config(data, where: str) -> SAERecord:
    """A config.json's content as a record, or a one-line UserError naming ``where`` and the key."""
    return SAERecord.from_json(data, where)


def sae_config_json(config: dict, where: str) -> dict:
    """What to write for ``config``: checked, its values as the record types them, the keys it has
    plus ``schema_version``."""
    checked = read_sae_config({k: v for k, v in config.items() if k != "schema_version"}, where).to_json()
    return {k: v for k, v in checked.items() if k in config or k == "schema_version"}
