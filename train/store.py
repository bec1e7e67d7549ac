"""SAEs in the lake: ``<root>/saes/<name>/`` holds config.json, weights.safetensors,
metrics.json and checkpoints/. Weights are safetensors (never pickles); the config is
written after the normalization is folded into the weights, so a reloaded SAE works on raw
activations as stored in the lake.
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from saelake.catalog import SAE_COLUMNS
from saelake.lake import Lake, UserError
from saelake.lake.storage import check_name

from . import dictionaries
from .dictionaries import Dictionary
from .records import SAERecord, read_sae_config, sae_config_json

# Names of the metric definitions (DESIGN §6); every stored number names its definition.
METRIC_DEFINITIONS = {
    "fvu": "sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over the evaluation tokens (mean over those "
    "tokens, per dimension); explained_variance = 1 - fvu",
    "l0": "mean over tokens of the number of non-zero latents",
    "dead_fraction": "fraction of latents with no activation in the last N tokens (N = dead_window)",
    "ce_loss_recovered": "(CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean), SAE reconstruction "
    "spliced into the out hook at non-BOS positions; BOS positions excluded from the losses",
    "delta_lm_loss": "CE_sae - CE_clean (nats per token, BOS positions excluded)",
    "kl": "mean over non-BOS positions of KL(p_clean || p_sae) (nats)",
}
CATALOG_COLUMNS = SAE_COLUMNS  # the catalog's saes columns: a config holds each (None when unknown)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def to_bytes(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> bytes:
    return st_save(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        metadata={k: str(v) for k, v in (meta or {}).items()},
    )


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return st_load(data)


def read_weights(data: bytes, cfg: dict, where: str) -> dict[str, torch.Tensor]:
    """An SAE's weights file (``data``, read from ``where``), checked against the ``weights_sha256``
    its config recorded; safetensors only, never a pickle."""
    want = cfg.get("weights_sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise UserError(
            f"SAE {cfg.get('name')!r}: {where} is damaged (its content does not match the "
            "weights_sha256 recorded in config.json): restore it from a copy or train the SAE again"
        )
    try:
        return from_bytes(data)
    except Exception as e:  # safetensors' own error types vary with the damage
        raise UserError(
            f"SAE {cfg.get('name')!r}: {where} is not a readable safetensors file ({str(e).splitlines()[0][:120]})"
        ) from None


class SAEStore:
    """Files of the SAEs in one lake."""

    def __init__(self, lake: Lake | str):
        self.lake = lake if isinstance(lake, Lake) else Lake(lake)
        self.st = self.lake.storage

    def names(self) -> list[str]:
        return [n for n in self.st.listdir("saes") if self.st.exists("saes", n, "config.json")]

    def exists(self, name: str) -> bool:
        return self.st.exists("saes", check_name(name, "SAE name"), "config.json")

    def config(self, name: str) -> dict:
        """The SAE's config.json as written, checked (``record`` for the typed view)."""
        cfg = self.st.read_json("saes", check_name(name, "SAE name"), "config.json")
        if cfg is None:
            known = self.names()
            raise UserError(
                f"no SAE {name!r} in {self.lake.root}"
                + (f": SAEs are {', '.join(known[:20])}" if known else ": train one with `lake train`")
            )
        read_sae_config(cfg, self.st.uri("saes", name, "config.json"))
        return cfg

    def record(self, name: str) -> SAERecord:
        return read_sae_config(self.config(name), self.st.uri("saes", name, "config.json"))

    def metrics(self, name: str) -> list[dict]:
        return self.st.read_json("saes", name, "metrics.json") or []

    def read_bytes(self, *parts: str) -> bytes:
        with self.st.fs.open(self.st.uri(*parts), "rb") as f:
            return f.read()

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """The SAE's weights, checked against the ``weights_sha256`` its config recorded."""
        cfg = self.config(name)
        if not self.st.exists("saes", name, "weights.safetensors"):
            raise UserError(f"SAE {name!r} has no weights yet (status {cfg.get('status')})")
        return read_weights(
            self.read_bytes("saes", name, "weights.safetensors"), cfg, self.st.uri("saes", name, "weights.safetensors")
        )

    def save(
        self,
        config: dict,
        weights: dict[str, torch.Tensor] | None = None,
        metrics: list[dict] | None = None,
        register: bool = True,
    ) -> None:
        """Weights first, then metrics, then the config (its status says the rest is there)."""
        name = check_name(config["name"], "SAE name")
        sae_config_json(config, self.st.uri("saes", name, "config.json"))  # nothing written for a bad config
        if weights is not None:
            data = to_bytes(weights, {"format": "saelake-sae"})
            self.st.write_bytes(data, "saes", name, "weights.safetensors")
            config["weights_sha256"] = hashlib.sha256(data).hexdigest()  # `lake verify` checks it
        if metrics is not None:
            self.st.write_json(metrics, "saes", name, "metrics.json")
        where = self.st.uri("saes", name, "config.json")
        self.st.write_json(sae_config_json(config, where), "saes", name, "config.json")
        if register:
            self.register(name)

    def register(self, name: str) -> None:
        from saelake.catalog import CatalogError

        try:
            # (an empty metrics list would make the catalog's executemany fail: pass None then)
            self.lake.catalog.upsert_sae(self.config(name), self.st.uri("saes", name), self.metrics(name) or None)
        except CatalogError as e:
            raise UserError(f"{e} (the SAE is saved; run `lake catalog sync` later)") from None

    def load(self, name: str, device: str = "cpu") -> tuple[Dictionary, dict]:
        """A trained SAE (normalization folded in: it takes raw activations) and its config."""
        cfg = self.config(name)
        return sae_from_weights(cfg, self.weights(name), device), cfg

    # -- checkpoints --------------------------------------------------------------------------
    def write_checkpoint(self, name: str, tensors: dict[str, torch.Tensor], state: dict) -> None:
        old = self.st.read_json("saes", name, "checkpoints", "state.json")
        fname = f"step-{state['step']:09d}.safetensors"
        self.st.write_bytes(to_bytes(tensors), "saes", name, "checkpoints", fname)
        self.st.write_json({**state, "tensors": fname}, "saes", name, "checkpoints", "state.json")
        if old and old.get("tensors") and old["tensors"] != fname:
            self.st.remove("saes", name, "checkpoints", old["tensors"])

    def read_checkpoint(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        state = self.st.read_json("saes", name, "checkpoints", "state.json")
        if state is None:
            return None
        return from_bytes(self.read_bytes("saes", name, "checkpoints", state["tensors"])), state


def sae_from_weights(cfg: dict, w: dict[str, torch.Tensor], device: str = "cpu") -> Dictionary:
    """The dictionary a config describes, with these weights, ready for inference."""
    kind = dictionaries.get(cfg["arch"])
    d_in, d_sae, d_out = kind.dims(w)
    hooks = cfg.get("hooks") or (cfg["hook"].split(",") if cfg.get("hook") else None)
    out_hooks = cfg.get("out_hooks") or (cfg["out_hook"].split(",") if cfg.get("out_hook") else hooks)
    sae = kind.build(
        d_in,
        d_sae,
        d_out,
        device=device,
        hooks=hooks,
        out_hooks=out_hooks,
        apply_b_dec_to_input=cfg.get("apply_b_dec_to_input"),
        **config_options(cfg),
    )
    sae.load_member(0, {k: v.to(device, torch.float32) for k, v in w.items()})
    return sae.inference()


def config_options(cfg: dict) -> dict:
    """The kind's options an SAE config records (None: not recorded, the kind's default): from its
    ``hyperparameters`` (what training resolved) or, for keys not there (imported SAEs, plain dicts),
    from its top level."""
    hp = cfg.get("hyperparameters") or {}
    return {f.name: hp.get(f.name, cfg.get(f.name)) for f in dataclasses.fields(dictionaries.get(cfg["arch"]).Options)}


def fold_normalization(
    state: dict[str, torch.Tensor], s_in: torch.Tensor, s_out: torch.Tensor, arch: str
) -> dict[str, torch.Tensor]:
    """Weights trained on ``x·s_in`` (target ``y·s_out``) -> weights for raw ``x`` and ``y`` (the kind's ``fold``)."""
    return dictionaries.get(arch).fold(state, s_in, s_out)


def scale_vector(hooks: list[str], scales: dict[str, float], d_model: dict[str, int]) -> torch.Tensor:
    return torch.cat([torch.full((d_model[h],), float(scales[h])) for h in hooks])
