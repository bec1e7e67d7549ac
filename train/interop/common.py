"""What every import produces (``Imported``: a kind, its weights for raw activations, its hooks) and
how it is registered in the lake like a trained SAE; the file readers the formats share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saelake.lake import Lake, UserError
from saelake.lake.storage import check_name

from ..dictionaries import Dictionary
from ..store import CATALOG_COLUMNS, METRIC_DEFINITIONS, SAEStore, now

SAE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")  # the SAE family's tensors, SAELens orientation


@dataclass
class Imported:
    """A dictionary read from another tool's files, its scaling already folded in.

    ``weights``: one member's tensors as the kind's ``load_member`` takes them (W_enc [d_in, d_sae],
    W_dec [d_sae, d_out], ...), for raw activations. ``normalization``: what was folded and how."""

    kind: type[Dictionary]
    weights: dict[str, torch.Tensor]
    options: dict
    hooks: list[str]
    out_hooks: list[str]
    apply_b_dec_to_input: bool | None  # the SAE family's switch (None: a kind without it)
    source_format: str
    source_cfg: dict
    normalization: dict = field(default_factory=lambda: {"method": "none", "folded": True})
    model: str | None = None
    dataset: str | None = None


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as float32 tensors (never a pickle)."""
    try:
        w = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    return {k: v.float() for k, v in w.items()}


def need(w: dict, keys, where) -> None:
    missing = [k for k in keys if k not in w]
    if missing:
        raise UserError(f"{where} has no {', '.join(missing)} (it has {', '.join(sorted(w)) or 'no tensors'})")


def check_shapes(w: dict[str, torch.Tensor], where) -> tuple[int, int, int]:
    """(d_in, d_sae, d_out) of SAE-family tensors, or one line saying which shape is wrong."""
    need(w, SAE_TENSORS, where)
    W_enc, W_dec = w["W_enc"], w["W_dec"]
    if (
        W_enc.dim() != 2
        or W_dec.dim() != 2
        or W_dec.shape[0] != W_enc.shape[1]
        or w["b_enc"].shape != (W_enc.shape[1],)
        or w["b_dec"].shape != (W_dec.shape[1],)
    ):
        raise UserError(
            f"{where}: W_enc must be [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae] and b_dec "
            f"[d_out], got {list(W_enc.shape)}, {list(W_dec.shape)}, {list(w['b_enc'].shape)} and "
            f"{list(w['b_dec'].shape)}"
        )
    if "threshold" in w and w["threshold"].shape not in ((W_enc.shape[1],), ()):
        raise UserError(f"{where}: threshold must be [d_sae] ({W_enc.shape[1]}), got {list(w['threshold'].shape)}")
    bad = [k for k, v in w.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{where}: {', '.join(bad)} hold NaN or infinite values")
    return int(W_enc.shape[0]), int(W_enc.shape[1]), int(W_dec.shape[1])


def register(lake: Lake | str, imp: Imported, name: str, source: str) -> dict:
    """Save an imported dictionary as SAE ``name`` (claimed atomically) and catalog it."""
    store = SAEStore(lake)
    check_name(name, "SAE name")
    if store.exists(name):
        raise UserError(f"SAE name {name!r} is taken in {store.lake.root}: pick another --name")
    if "W_dec" in imp.weights:  # the SAE family
        d_in, d_sae, d_out = check_shapes(imp.weights, source)
    else:  # another kind: its own saved shapes
        d_in, d_sae, d_out = imp.kind.dims(imp.weights)
        bad = [k for k, v in imp.weights.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise UserError(f"{source}: {', '.join(bad)} hold NaN or infinite values")
    if "threshold" in imp.weights and imp.weights["threshold"].dim() == 0:
        imp.weights["threshold"] = imp.weights["threshold"].expand(d_sae).clone()
    # the kind itself must take these weights (shapes, options): build it once before anything is written
    extra = {} if imp.apply_b_dec_to_input is None else {"apply_b_dec_to_input": imp.apply_b_dec_to_input}
    sae = imp.kind.build(d_in, d_sae, d_out, hooks=imp.hooks, out_hooks=imp.out_hooks, **extra, **imp.options)
    sae.load_member(0, imp.weights)
    weights = {k: v.float().contiguous() for k, v in imp.weights.items()}  # as read: export gives the same bytes
    cfg = {c: None for c in CATALOG_COLUMNS} | {
        "name": name,
        "arch": imp.kind.name,
        "hook": ",".join(imp.hooks),
        "out_hook": ",".join(imp.out_hooks),
        "hooks": imp.hooks,
        "out_hooks": imp.out_hooks,
        "d_in": d_in,
        "d_sae": d_sae,
        "d_out": d_out,
        "k": imp.options.get("k"),
        "status": "imported",
        "created": now(),
        "model": imp.model,
        "dataset": imp.dataset,
        "apply_b_dec_to_input": imp.apply_b_dec_to_input,
        "hyperparameters": imp.options,
        "normalization": imp.normalization,
        "imported_from": source,
        "import_format": imp.source_format,
        "source_cfg": imp.source_cfg,
        "metric_definitions": METRIC_DEFINITIONS,
    }
    store.st.claim("saes", name, owner="lake import")  # of two imports named alike, one goes on
    store.save(cfg, weights, [])
    return cfg
