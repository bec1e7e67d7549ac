"""SAELens on-disk format: ``cfg.json`` + ``sae_weights.safetensors`` (+ sparsity files, not read).

Weights: ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_out]``, ``b_dec`` (+ ``threshold``
for JumpReLU). The lake's weights already have the normalization folded in, so exports say
``normalize_activations: "none"`` and work on raw activations. Each dictionary kind says how it
reads in SAELens (``saelens_export`` / ``saelens_import``): BatchTopK, for one, exports as JumpReLU
with its inference threshold (that is what it is at inference) and comes back as BatchTopK.

Imports fold SAELens' input scaling exactly, keeping the latents SAELens computes:
- ``none``: nothing to fold;
- ``expected_average_only_in``: inputs were multiplied by a factor s that SAELens keeps outside
  cfg.json (``activation_scaler.json`` in a training checkpoint, ``norm_scaling_factor`` in its list
  of pretrained SAEs): W_enc·s, W_dec/s, b_dec/s, as SAELens' ``fold_activation_norm_scaling_factor``;
- ``covariance_whitening``: inputs were whitened, z = (x - mean) @ M, outputs unwhitened with M^-1
  (``activation_whitening.safetensors`` beside the scaler): W_enc' = M @ W_enc, W_dec' = W_dec @ M^-1,
  b_dec' = b_dec @ M^-1 + mean, and b_enc' = b_enc - mean @ M @ W_enc when b_dec is not applied to the
  input, as SAELens' ``fold_activation_whitening``;
- ``constant_norm_rescale`` and ``layer_norm`` scale each token by its own norm (and shift it):
  no weights express that, so they are refused with the reason;
- TopK with ``rescale_acts_by_decoder_norm``: the decoder norms fold into the encoder (exact).
Imports never unpickle: weights are read with safetensors only.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from safetensors.torch import save_file

from saelake.lake import Lake, UserError

from .. import dictionaries
from ..store import SAEStore, config_options
from .common import Imported, check_shapes, need, read_json, read_tensors

FILES = ("cfg.json", "sae_weights.safetensors")
SCALER = "activation_scaler.json"  # SAELens' training checkpoints keep the input scale here
WHITENING = "activation_whitening.safetensors"  # ... and the whitening (mean, matrix, inverse_matrix)
TRANSCODERS = {"transcoder": "standard", "jumprelu_transcoder": "jumprelu"}  # -> the SAE architecture
PER_TOKEN = {
    "constant_norm_rescale": "rescales every token to norm sqrt(d_in)",
    "layer_norm": "centres and scales every token by its own mean and standard deviation",
}


def is_saelens(path: Path) -> bool:
    return all((path / f).is_file() for f in FILES)


# -- export ---------------------------------------------------------------------------------------
def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: give a new folder to export into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"{out} is not empty: give an empty or new folder, or pass --force to overwrite {' and '.join(FILES)} there"
        )


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
    if getattr(options, "decoder_norm_topk", False):
        raise UserError(
            f"SAE {name!r} selects its top k by pre-activation x decoder norm: SAELens' topk selects by "
            "pre-activation, so it has no format for it"
        )
    w = store.weights(name)
    tensors = {k: w[k].float().contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if "threshold" in w:
        tensors["threshold"] = w["threshold"].float().contiguous()
    layer = re.match(r"blocks\.(\d+)\.", cfg["hook"])
    transcoder = cfg["out_hook"] != cfg["hook"]
    architecture = fmt.architecture
    if transcoder:
        architecture = {v: k for k, v in TRANSCODERS.items()}.get(architecture, architecture)
    scfg = {
        "architecture": architecture,
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "dtype": "float32",
        "device": "cpu",
        "model_name": cfg.get("model"),
        "hook_name": cfg["hook"],
        "hook_layer": int(layer.group(1)) if layer else None,
        "hook_head_index": None,
        "activation_fn_str": fmt.activation_fn,
        "activation_fn_kwargs": fmt.activation_kwargs,
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input")),
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "prepend_bos": True,
        "context_size": None,
        "dataset_path": cfg.get("dataset"),
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "metadata": {
            "exported_by": "saelake",
            "saelake_name": name,
            "saelake_arch": kind.name,
            "run": cfg.get("run"),
            "version": cfg.get("version"),
            "fvu": cfg.get("fvu"),
            "l0": cfg.get("l0"),
            "bos_excluded": cfg.get("bos_excluded"),
            "outlier_factor": cfg.get("outlier_factor"),
            "normalization_folded": True,
        },
        **fmt.fields,
    }
    if transcoder:
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


# -- import ---------------------------------------------------------------------------------------
def _read_cfg(path: Path) -> dict:
    where = path / "cfg.json"
    scfg = read_json(where)
    meta = scfg.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise UserError(f"{where}: key 'metadata' must be a JSON object, not {meta!r:.40}")
    for key, typ in (
        ("architecture", str),
        ("hook_name", str),
        ("hook_name_out", str),
        ("normalize_activations", (str, bool)),
        ("activation_fn_kwargs", dict),
    ):
        if scfg.get(key) is not None and not isinstance(scfg[key], typ):
            raise UserError(
                f"{where}: key {key!r} must be a {'JSON object' if typ is dict else 'string'}, not {scfg[key]!r:.40}"
            )
    return scfg


def _scaling_factor(path: Path, given: float | None) -> float:
    """The ``expected_average_only_in`` factor: given, or SAELens' activation_scaler.json."""
    if given is None and (path / SCALER).is_file():
        given = read_json(path / SCALER).get("scaling_factor")
    if given is None:
        raise UserError(
            f"{path}: normalize_activations is 'expected_average_only_in', so its weights expect inputs "
            f"scaled by a factor SAELens keeps outside cfg.json (no {SCALER} here): pass "
            "--norm-scaling-factor F (SAELens' norm_scaling_factor for this SAE) to fold it in"
        )
    if isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isfinite(given) or given <= 0:
        raise UserError(f"{path}: the norm scaling factor must be a positive number, got {given!r}")
    return float(given)


def _fold_whitening(path: Path, w: dict, b_dec_on_input: bool) -> tuple[dict, dict]:
    if not (path / WHITENING).is_file():
        raise UserError(
            f"{path}: normalize_activations is 'covariance_whitening' but there is no {WHITENING} (the "
            "whitening SAELens trained with): it cannot be folded"
        )
    t = read_tensors(path / WHITENING)
    need(t, ("mean", "matrix", "inverse_matrix"), path / WHITENING)
    d = w["W_enc"].shape[0]
    if t["matrix"].shape != (d, d) or t["inverse_matrix"].shape != (d, d) or t["mean"].shape != (d,):
        raise UserError(f"{path / WHITENING}: mean must be [{d}] and the matrices [{d}, {d}]")
    M, M_inv, mean = t["matrix"].double(), t["inverse_matrix"].double(), t["mean"].double()
    W_enc = M @ w["W_enc"].double()
    b_enc = w["b_enc"].double() - (0 if b_dec_on_input else mean @ W_enc)
    out = {
        **w,
        "W_enc": W_enc.float(),
        "b_enc": b_enc.float(),
        "W_dec": (w["W_dec"].double() @ M_inv).float(),
        "b_dec": (w["b_dec"].double() @ M_inv + mean).float(),
    }
    return out, {"method": "saelens:covariance_whitening", "folded": True}


def read_saelens(
    path: Path, *, norm_scaling_factor: float | None = None, hook: str | None = None, out_hook: str | None = None
) -> Imported:
    scfg = _read_cfg(path)
    meta = scfg.get("metadata") or {}
    architecture = scfg.get("architecture") or "standard"
    transcoder = architecture in TRANSCODERS
    base = TRANSCODERS.get(architecture, architecture)
    kind = dictionaries.from_saelens(base)
    if meta.get("saelake_arch") in dictionaries.names():
        kind = dictionaries.get(meta["saelake_arch"])  # a saelake export: back to its own kind
    if kind is None:
        known = sorted({a for k in dictionaries.kinds() for a in k.saelens_imports} | set(TRANSCODERS))
        raise UserError(f"SAELens architecture {architecture!r} is not supported: use {', '.join(known)}")
    norm = scfg.get("normalize_activations", "none")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)  # SAELens < 6: a bool
    if norm in PER_TOKEN:
        raise UserError(
            f"{path}: normalize_activations is {norm!r}, which {PER_TOKEN[norm]} at run time; saelake "
            "dictionaries take raw activations with any scaling folded into their weights, and no "
            "weights express a per-token scale: this SAE cannot be imported"
        )
    if norm not in ("none", "expected_average_only_in", "covariance_whitening"):
        raise UserError(
            f"{path}: unknown normalize_activations {norm!r} (SAELens writes none, "
            "expected_average_only_in, covariance_whitening, constant_norm_rescale or layer_norm)"
        )
    if scfg.get("reshape_activations", "none") not in ("none", None):
        raise UserError(
            f"{path}: reshape_activations {scfg['reshape_activations']!r} (per-head hook_z SAEs) is not "
            "supported: saelake hooks give one vector per token"
        )
    w = read_tensors(path / FILES[1])
    if architecture == "batchtopk" and "topk_threshold" in w:  # a training checkpoint: its inference threshold
        w["threshold"] = w.pop("topk_threshold").reshape(()).expand(w["b_enc"].shape).clone()
    if "W_skip" in w:
        raise UserError(f"{path}: a skip transcoder (W_skip): no saelake kind has a skip connection")
    d_in, d_sae, d_out = check_shapes(w, path / FILES[1])
    options = kind.saelens_import(scfg, w, str(path))
    weights = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if "threshold" in w else ())}
    if scfg.get("rescale_acts_by_decoder_norm"):  # topk on pre·|W_dec|, decoded with W_dec/|W_dec|: fold it
        n = weights["W_dec"].norm(dim=1).clamp_min(1e-12)
        weights |= {
            "W_enc": weights["W_enc"] * n,
            "b_enc": weights["b_enc"] * n,
            "W_dec": weights["W_dec"] / n.unsqueeze(1),
        }
    normalization = {"method": "none", "folded": True}
    if norm == "expected_average_only_in":
        s = _scaling_factor(path, norm_scaling_factor)
        weights |= {"W_enc": weights["W_enc"] * s, "W_dec": weights["W_dec"] / s, "b_dec": weights["b_dec"] / s}
        normalization = {"method": "saelens:expected_average_only_in", "scaling_factor": s, "folded": True}
    if norm == "covariance_whitening":
        weights, normalization = _fold_whitening(path, weights, bool(scfg.get("apply_b_dec_to_input", True)))
    hook = hook or scfg.get("hook_name") or meta.get("hook_name") or scfg.get("hook_point")
    out_hook = out_hook or scfg.get("hook_name_out") or meta.get("hook_name_out") or (None if transcoder else hook)
    if not hook:
        raise UserError(f"{path}: cfg.json names no hook_name: pass --hook")
    if not out_hook:
        raise UserError(f"{path}: a transcoder whose cfg.json names no output hook (hook_name_out): pass --out-hook")
    if out_hook == hook and d_out != d_in:
        raise UserError(
            f"{path}: W_dec writes {d_out} values but reads {d_in} at one hook: a transcoder needs --out-hook"
        )
    apply_b_dec = bool(scfg.get("apply_b_dec_to_input", not transcoder)) and d_in == d_out
    return Imported(
        kind=kind,
        weights=weights,
        options=options,
        hooks=[hook],
        out_hooks=[out_hook],
        apply_b_dec_to_input=apply_b_dec,
        source_format="saelens",
        source_cfg=scfg,
        normalization=normalization,
        model=scfg.get("model_name") or meta.get("model_name"),
        dataset=scfg.get("dataset_path") or meta.get("dataset_path"),
    )
