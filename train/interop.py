"""SAELens on-disk format: ``cfg.json`` + ``sae_weights.safetensors``.

Weights: ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec`` (+ ``threshold``
for JumpReLU). The lake's weights already have the normalization folded in, so exports say
``normalize_activations: "none"`` and work on raw activations. Each dictionary kind says how it
reads in SAELens (``saelens_export`` / ``saelens_import``): BatchTopK, for one, exports as JumpReLU
with its inference threshold (that is what it is at inference) and comes back as BatchTopK.
Imports never unpickle: weights are read with safetensors only.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelake.lake import Lake, UserError
from saelake.lake.storage import check_name

from . import dictionaries
from .store import CATALOG_COLUMNS, METRIC_DEFINITIONS, SAEStore, config_options, now

FILES = ("cfg.json", "sae_weights.safetensors")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: give a new folder to export into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty: give an empty or new folder, or pass --force to overwrite "
                        f"{' and '.join(FILES)} there")


def export_saelens(lake: Lake | str, name: str, out: str | Path, force: bool = False) -> Path:
    store = SAEStore(lake)
    cfg = store.config(name)
    out = Path(out)
    _check_out(out, force)
    if cfg.get("status") not in ("complete", "imported"):
        raise UserError(f"SAE {name!r} is {cfg.get('status')}: only finished SAEs can be exported")
    if len(cfg["hooks"]) != 1 or len(cfg["out_hooks"]) != 1:
        raise UserError(f"SAE {name!r} is a crosscoder ({len(cfg['hooks'])} hooks): SAELens has no format for it")
    kind = dictionaries.get(cfg["arch"])
    options = kind.Options(**{k: v for k, v in config_options(cfg).items() if v is not None})
    fmt = kind.saelens_export(options)
    if fmt is None:
        raise UserError(f"SAE {name!r} is a {kind.name}: SAELens has no format for it")
    w = store.weights(name)
    tensors = {k: w[k].float().contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if "threshold" in w:
        tensors["threshold"] = w["threshold"].float().contiguous()
    layer = re.match(r"blocks\.(\d+)\.", cfg["hook"])
    scfg = {
        "architecture": fmt.architecture, "d_in": cfg["d_in"], "d_sae": cfg["d_sae"],
        "dtype": "float32", "device": "cpu", "model_name": cfg.get("model"), "hook_name": cfg["hook"],
        "hook_layer": int(layer.group(1)) if layer else None, "hook_head_index": None,
        "activation_fn_str": fmt.activation_fn, "activation_fn_kwargs": fmt.activation_kwargs,
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input")), "normalize_activations": "none",
        "finetuning_scaling_factor": False, "prepend_bos": True, "context_size": None,
        "dataset_path": cfg.get("dataset"), "sae_lens_training_version": None, "neuronpedia_id": None,
        "metadata": {"exported_by": "saelake", "saelake_name": name, "saelake_arch": kind.name,
                     "run": cfg.get("run"), "version": cfg.get("version"), "fvu": cfg.get("fvu"), "l0": cfg.get("l0"),
                     "bos_excluded": cfg.get("bos_excluded"), "outlier_factor": cfg.get("outlier_factor"),
                     "normalization_folded": True},
        **fmt.fields,
    }
    if cfg["out_hook"] != cfg["hook"]:  # a transcoder
        scfg |= {"hook_name_out": cfg["out_hook"], "d_out": cfg.get("d_out", tensors["W_dec"].shape[1])}
    out.mkdir(parents=True, exist_ok=True)
    # each file appears whole (written aside, then renamed)
    tmp = out / f".{FILES[1]}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / FILES[1])
    tmp = out / f".{FILES[0]}.tmp"
    tmp.write_text(json.dumps(scfg, indent=2))
    os.replace(tmp, out / FILES[0])
    return out


def _read_cfg(path: Path) -> dict:
    where = path / "cfg.json"
    try:
        scfg = json.loads(where.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(scfg, dict):
        raise UserError(f"{where} must hold a JSON object, not {type(scfg).__name__}")
    for key, typ in (("architecture", str), ("hook_name", str), ("hook_name_out", str),
                     ("normalize_activations", str), ("metadata", dict), ("activation_fn_kwargs", dict)):
        if scfg.get(key) is not None and not isinstance(scfg[key], typ):
            raise UserError(f"{where}: key {key!r} must be a {'string' if typ is str else 'JSON object'}, "
                            f"not {scfg[key]!r:.40}")
    return scfg


def _read_weights(path: Path) -> dict:
    where = path / "sae_weights.safetensors"
    try:
        w = load_file(str(where))  # safetensors: a JSON header and raw tensors, never a pickle
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{where} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if key not in w:
            raise UserError(f"{where} has no {key}")
    d_in, d_sae = w["W_enc"].shape if w["W_enc"].dim() == 2 else (None, None)
    if d_in is None or w["W_dec"].dim() != 2 or w["W_dec"].shape[0] != d_sae or w["b_enc"].shape != (d_sae,):
        raise UserError(f"{where}: W_enc must be [d_in, d_sae], W_dec [d_sae, d_out] and b_enc [d_sae], got "
                        f"{list(w['W_enc'].shape)}, {list(w['W_dec'].shape)} and {list(w['b_enc'].shape)}")
    return w


def import_saelens(lake: Lake | str, path: str | Path, name: str) -> dict:
    store = SAEStore(lake)
    check_name(name, "SAE name")
    path = Path(path)
    if not all((path / f).is_file() for f in FILES):
        raise UserError(f"{path} is not a SAELens SAE folder: it needs {' and '.join(FILES)}")
    if store.exists(name):
        raise UserError(f"SAE name {name!r} is taken in {store.lake.root}: pick another --name")
    scfg = _read_cfg(path)
    architecture = scfg.get("architecture") or "standard"
    meta = scfg.get("metadata") or {}
    kind = dictionaries.from_saelens(architecture)
    if meta.get("saelake_arch") in dictionaries.names():
        kind = dictionaries.get(meta["saelake_arch"])  # a saelake export: back to its own kind
    if kind is None:
        known = sorted({a for k in dictionaries.kinds() for a in k.saelens_imports})
        raise UserError(f"SAELens architecture {architecture!r} is not supported: use {', '.join(known)}")
    if scfg.get("normalize_activations", "none") not in ("none", None):
        raise UserError(f"{path}: normalize_activations is {scfg['normalize_activations']!r}; only 'none' can be "
                        "imported (fold the scaling factor into the weights first)")
    w = _read_weights(path)
    options = kind.saelens_import(scfg, w, str(path))
    d_in, d_sae = w["W_enc"].shape
    hook = scfg.get("hook_name") or "unknown"
    out_hook = scfg.get("hook_name_out") or hook
    weights = {key: w[key].float() for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if "threshold" in w:
        weights["threshold"] = w["threshold"].float()
    cfg = {c: None for c in CATALOG_COLUMNS} | {
        "name": name, "arch": kind.name, "hook": hook, "out_hook": out_hook, "hooks": [hook], "out_hooks": [out_hook],
        "d_in": int(d_in), "d_sae": int(d_sae), "d_out": int(w["W_dec"].shape[1]), "k": options.get("k"),
        "status": "imported", "created": now(), "model": scfg.get("model_name"),
        "apply_b_dec_to_input": bool(scfg.get("apply_b_dec_to_input", True)), "hyperparameters": options,
        "normalization": {"method": "none", "folded": True}, "imported_from": str(path.resolve()),
        "saelens_cfg": scfg, "metric_definitions": METRIC_DEFINITIONS,
    }
    store.st.claim("saes", name, owner="lake import")  # of two imports named alike, one goes on
    store.save(cfg, weights, [])
    return cfg
