"""SAELens on-disk format: ``cfg.json`` + ``sae_weights.safetensors``.

Weights: ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec`` (+ ``threshold``
for JumpReLU). The lake's weights already have the normalization folded in, so exports say
``normalize_activations: "none"`` and work on raw activations. BatchTopK exports as JumpReLU
with its inference threshold (that is what it is at inference).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from saelake.lake import Lake, UserError
from saelake.lake.storage import check_name

from .store import CATALOG_COLUMNS, METRIC_DEFINITIONS, SAEStore, now

TO_SAELENS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": None}


def export_saelens(lake: Lake | str, name: str, out: str | Path) -> Path:
    store = SAEStore(lake)
    cfg = store.config(name)
    if cfg.get("status") not in ("complete", "imported"):
        raise UserError(f"SAE {name!r} is {cfg.get('status')}: only finished SAEs can be exported")
    if len(cfg["hooks"]) != 1 or len(cfg["out_hooks"]) != 1:
        raise UserError(f"SAE {name!r} is a crosscoder ({len(cfg['hooks'])} hooks): SAELens has no format for it")
    w = store.weights(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: w[k].float().contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if "threshold" in w:
        tensors["threshold"] = w["threshold"].float().contiguous()
    layer = re.match(r"blocks\.(\d+)\.", cfg["hook"])
    transcoder = cfg["out_hook"] != cfg["hook"]
    scfg = {
        "architecture": TO_SAELENS[cfg["arch"]], "d_in": cfg["d_in"], "d_sae": cfg["d_sae"],
        "dtype": "float32", "device": "cpu", "model_name": cfg.get("model"), "hook_name": cfg["hook"],
        "hook_layer": int(layer.group(1)) if layer else None, "hook_head_index": None,
        "activation_fn_str": "topk" if cfg["arch"] == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg["k"]} if cfg["arch"] == "topk" else {},
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input")), "normalize_activations": "none",
        "finetuning_scaling_factor": False, "prepend_bos": True, "context_size": None,
        "dataset_path": cfg.get("dataset"), "sae_lens_training_version": None, "neuronpedia_id": None,
        "metadata": {"exported_by": "saelake", "saelake_name": name, "saelake_arch": cfg["arch"],
                     "run": cfg.get("run"), "version": cfg.get("version"), "fvu": cfg.get("fvu"), "l0": cfg.get("l0"),
                     "bos_excluded": cfg.get("bos_excluded"), "outlier_factor": cfg.get("outlier_factor"),
                     "normalization_folded": True},
    }
    if cfg["arch"] == "topk":
        scfg["k"] = cfg["k"]
    if transcoder:
        scfg |= {"hook_name_out": cfg["out_hook"], "d_out": cfg.get("d_out", tensors["W_dec"].shape[1])}
    save_file(tensors, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(scfg, indent=2))
    return out


def import_saelens(lake: Lake | str, path: str | Path, name: str) -> dict:
    store = SAEStore(lake)
    check_name(name, "SAE name")
    path = Path(path)
    if not (path / "cfg.json").exists() or not (path / "sae_weights.safetensors").exists():
        raise UserError(f"{path} is not a SAELens SAE folder: it needs cfg.json and sae_weights.safetensors")
    if store.exists(name):
        raise UserError(f"SAE name {name!r} is taken in {store.lake.root}: pick another --name")
    scfg = json.loads((path / "cfg.json").read_text())
    arch = FROM_SAELENS.get(scfg.get("architecture", "standard"))
    if arch is None:
        raise UserError(f"SAELens architecture {scfg.get('architecture')!r} is not supported: use standard, topk "
                        "or jumprelu")
    if scfg.get("normalize_activations", "none") not in ("none", None):
        raise UserError(f"{path}: normalize_activations is {scfg['normalize_activations']!r}; only 'none' can be "
                        "imported (fold the scaling factor into the weights first)")
    w = load_file(str(path / "sae_weights.safetensors"))
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if key not in w:
            raise UserError(f"{path}/sae_weights.safetensors has no {key}")
    if arch == "jumprelu" and "threshold" not in w:
        raise UserError(f"{path}: a jumprelu SAE needs a threshold tensor")
    d_in, d_sae = w["W_enc"].shape
    k = scfg.get("k") or (scfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "topk" and not k:
        raise UserError(f"{path}: a topk SAE needs k in cfg.json")
    meta = scfg.get("metadata") or {}
    if meta.get("saelake_arch") == "batchtopk":
        arch = "batchtopk"  # round trip: a JumpReLU with one threshold
    hook = scfg.get("hook_name") or "unknown"
    out_hook = scfg.get("hook_name_out") or hook
    weights = {key: w[key].float() for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if "threshold" in w:
        weights["threshold"] = w["threshold"].float()
    cfg = {c: None for c in CATALOG_COLUMNS} | {
        "name": name, "arch": arch, "hook": hook, "out_hook": out_hook, "hooks": [hook], "out_hooks": [out_hook],
        "d_in": int(d_in), "d_sae": int(d_sae), "d_out": int(w["W_dec"].shape[1]), "k": int(k) if k else None,
        "status": "imported", "created": now(), "model": scfg.get("model_name"),
        "apply_b_dec_to_input": bool(scfg.get("apply_b_dec_to_input", True)),
        "normalization": {"method": "none", "folded": True}, "imported_from": str(path.resolve()),
        "saelens_cfg": scfg, "metric_definitions": METRIC_DEFINITIONS,
    }
    store.save(cfg, weights, [])
    return cfg
