"""Llamascopium (OpenMOSS Language-Model-SAEs, the Llama Scope tools): ``config.json`` +
``sae_weights.safetensors`` (or ``checkpoints/final.safetensors``), optional ``lm_config.json``.

A ``sae_type: "sae"`` dictionary reads ``hook_point_in`` and writes ``hook_point_out`` (a
transcoder when they differ; both are TransformerLens names). With ``norm_activation:
"dataset-wise"`` it was trained on inputs scaled by s_in = sqrt(d_model)/norm_in and targets by
s_out = sqrt(d_model)/norm_out (the norms are the ``dataset_average_activation_norm.<hook>``
tensors). Its forward, on raw activations, is

    pre = (x·s_in) @ W_E + b_E;  f = act(pre)  (with sparsity_include_decoder_norm: act(pre·|W_D|)/|W_D|)
    y = (f @ W_D + b_D) / s_out

Folded as Llamascopium's own ``standardize_parameters_of_dataset_norm`` does (latents f/s_in,
"the real magnitude of feature activations"): b_enc = b_E/s_in, W_dec = W_D·s_in/s_out,
b_dec = b_D/s_out, and a JumpReLU threshold θ becomes θ/(s_in·|W_D row|) per latent, so that
exactly the same latents fire. TopK with decoder norms selects by pre-activation x decoder norm
(the ``topk`` kind's ``decoder_norm_topk``). Refused with the reason: token-wise and batch-wise
normalization (a per-token or per-batch scale), GLU encoders, batch-level top-k (no threshold to
run it per token), and the other sae_types (crosscoders, Lorsa, top-k CLTs). JumpReLU cross-layer
transcoders (``sae_type: "clt"``) come in as saelake's ``clt-jumprelu`` (``read_clt``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from saelake.lake import UserError

from .. import dictionaries
from .common import Imported, need, read_json, read_tensors

CONFIG = "config.json"
WEIGHTS = ("sae_weights.safetensors", "checkpoints/pruned.safetensors", "checkpoints/final.safetensors")
KINDS = {"relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}
THRESHOLD = "activation_function.log_jumprelu_threshold"


def weights_file(path: Path) -> Path | None:
    return next((path / f for f in WEIGHTS if (path / f).is_file()), None)


def is_llamascopium(path: Path) -> bool:
    if not (path / CONFIG).is_file() or weights_file(path) is None:
        return False
    try:
        return "sae_type" in read_json(path / CONFIG)
    except UserError:
        return False


def _norm(w: dict, hook: str, where) -> float:
    t = w.get(f"dataset_average_activation_norm.{hook}")
    value = float(t.reshape(-1)[0]) if t is not None and t.numel() == 1 else None
    if value is None or not math.isfinite(value) or value <= 0:
        raise UserError(
            f"{where}: norm_activation is 'dataset-wise' but it holds no positive "
            f"dataset_average_activation_norm.{hook}: the scale it was trained at is unknown"
        )
    return value


def read_llamascopium(path: Path, *, hook: str | None = None, out_hook: str | None = None) -> Imported:
    cfg = read_json(path / CONFIG)
    where = weights_file(path)
    if cfg.get("sae_type") == "clt":
        return read_clt(path, cfg, where, hook, out_hook)
    if cfg.get("sae_type") != "sae":
        raise UserError(
            f"{path}: sae_type {cfg.get('sae_type')!r} is not supported: saelake imports Llamascopium's "
            "'sae' dictionaries (SAEs and transcoders) and its JumpReLU 'clt's"
        )
    act = cfg.get("act_fn", "relu")
    if act not in KINDS:
        raise UserError(
            f"{path}: act_fn {act!r} is not supported (use {', '.join(KINDS)}"
            + (
                "; convert batch top-k to JumpReLU first with Llamascopium's topk_to_jumprelu_conversion"
                if "topk" in str(act)
                else ""
            )
            + ")"
        )
    if cfg.get("use_glu_encoder"):
        raise UserError(f"{path}: a GLU encoder (use_glu_encoder): no saelake kind has one")
    norm = cfg.get("norm_activation", "dataset-wise")
    if norm not in ("dataset-wise", "inference"):
        raise UserError(
            f"{path}: norm_activation {norm!r} scales each {'token' if norm == 'token-wise' else 'batch'} "
            "by its own norm at run time; no weights express that, so it cannot be imported"
        )
    hook_in, hook_out = cfg.get("hook_point_in"), cfg.get("hook_point_out")
    if not isinstance(hook_in, str) or not isinstance(hook_out, str):
        raise UserError(f"{path / CONFIG}: hook_point_in and hook_point_out must be hook names")
    w = read_tensors(where)
    need(w, ("W_E", "b_E", "W_D"), where)
    d_model = int(w["W_E"].shape[0])
    s_in = s_out = 1.0
    normalization = {"method": "none", "folded": True}
    if norm == "dataset-wise":
        n_in, n_out = _norm(w, hook_in, where), _norm(w, hook_out, where)
        s_in, s_out = math.sqrt(d_model) / n_in, math.sqrt(d_model) / n_out
        normalization = {
            "method": "llamascopium:dataset-wise",
            "dataset_average_activation_norm": {"in": n_in, "out": n_out},
            "s_in": s_in,
            "s_out": s_out,
            "folded": True,
        }
    W_D = w["W_D"]
    b_D = w["b_D"] if cfg.get("use_decoder_bias", True) else torch.zeros(W_D.shape[1])
    if cfg.get("use_decoder_bias", True):
        need(w, ("b_D",), where)
    weights = {"W_enc": w["W_E"], "b_enc": w["b_E"] / s_in, "W_dec": W_D * (s_in / s_out), "b_dec": b_D / s_out}
    with_norm = bool(cfg.get("sparsity_include_decoder_norm", True))
    options: dict = {}
    if act == "jumprelu":
        need(w, (THRESHOLD,), where)
        theta = w[THRESHOLD].exp()
        weights["threshold"] = theta / s_in / (W_D.norm(dim=1).clamp_min(1e-12) if with_norm else 1.0)
    elif act == "topk":
        k = cfg.get("top_k", 50)
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise UserError(f"{path / CONFIG}: top_k must be a positive integer, got {k!r}")
        options = {"k": k, "decoder_norm_topk": with_norm}
    model = None
    if (path / "lm_config.json").is_file():
        model = read_json(path / "lm_config.json").get("model_name")
    return Imported(
        kind=dictionaries.get(KINDS[act]),
        weights=weights,
        options=options,
        hooks=[hook or hook_in],
        out_hooks=[out_hook or (hook if hook and hook_in == hook_out else hook_out)],
        apply_b_dec_to_input=False,
        source_format="llamascopium",
        source_cfg=cfg,
        normalization=normalization,
        model=model if isinstance(model, str) else None,
    )


def read_clt(path: Path, cfg: dict, where: Path, hook: str | None, out_hook: str | None) -> Imported:
    """A cross-layer transcoder (``sae_type: "clt"``, JumpReLU) as saelake's ``clt-jumprelu``.

    Llamascopium keeps W_E [L, d, s], b_E [L, s], W_D.j [j+1, s, d] (the decoders from layers 0..j into
    layer j), b_D.j [d] and a log-threshold [L, s]; with decoder norms in the sparsity a latent of layer
    i fires when pre·‖all its decoders‖ > θ. Folded per layer as above (s_in of layer i's input hook,
    s_out of layer j's output hook): W_dec i->j = W_D.j[i]·s_in_i/s_out_j, b_dec_j = b_D.j/s_out_j,
    b_enc_i = b_E[i]/s_in_i, threshold_i = θ_i/(s_in_i·‖decoders‖)."""
    if hook or out_hook:
        raise UserError(f"{path}: a cross-layer transcoder names its hooks itself (hook_points_in/out)")
    if cfg.get("act_fn") != "jumprelu":
        raise UserError(
            f"{path}: a cross-layer transcoder with act_fn {cfg.get('act_fn')!r}: saelake imports "
            "Llamascopium's JumpReLU CLTs"
        )
    ins, outs = cfg.get("hook_points_in"), cfg.get("hook_points_out")
    if not (
        isinstance(ins, list)
        and isinstance(outs, list)
        and len(ins) == len(outs) > 0
        and all(isinstance(h, str) for h in ins + outs)
    ):
        raise UserError(f"{path / CONFIG}: hook_points_in and hook_points_out must be equally long lists of hooks")
    norm = cfg.get("norm_activation", "dataset-wise")
    if norm not in ("dataset-wise", "inference"):
        raise UserError(
            f"{path}: norm_activation {norm!r} scales each token or batch at run time; no weights "
            "express that, so it cannot be imported"
        )
    w = read_tensors(where)
    L = len(ins)
    need(
        w, ("W_E", "b_E", THRESHOLD) + tuple(f"W_D.{j}" for j in range(L)) + tuple(f"b_D.{j}" for j in range(L)), where
    )
    if norm == "dataset-wise":
        d = int(w["W_E"].shape[1])
        s_in = [math.sqrt(d) / _norm(w, h, where) for h in ins]
        s_out = [math.sqrt(d) / _norm(w, h, where) for h in outs]
    else:
        s_in = s_out = [1.0] * L
    dec = [[w[f"W_D.{j}"][i] * (s_in[i] / s_out[j]) for j in range(i, L)] for i in range(L)]  # i -> [s, d] per j
    norms = [torch.stack([w[f"W_D.{j}"][i] for j in range(i, L)]).pow(2).sum((0, 2)).sqrt() for i in range(L)]
    theta = w[THRESHOLD].exp()
    with_norm = bool(cfg.get("sparsity_include_decoder_norm", True))
    weights = {
        "W_enc": w["W_E"],
        "b_enc": torch.stack([w["b_E"][i] / s_in[i] for i in range(L)]),
        "b_dec": torch.cat([w[f"b_D.{j}"] / s_out[j] for j in range(L)]),
        "threshold": torch.stack(
            [theta[i] / s_in[i] / (norms[i].clamp_min(1e-12) if with_norm else 1.0) for i in range(L)]
        ),
    }
    weights |= {f"W_dec_{i}": torch.cat(dec[i], -1) for i in range(L)}
    normalization = {"method": f"llamascopium:{norm}", "s_in": s_in, "s_out": s_out, "folded": True}
    return Imported(
        kind=dictionaries.get("clt-jumprelu"),
        weights=weights,
        options={},
        hooks=list(ins),
        out_hooks=list(outs),
        apply_b_dec_to_input=None,
        source_format="llamascopium",
        source_cfg=cfg,
        normalization=normalization,
    )
