"""EleutherAI sparsify checkpoints: a folder per hookpoint with ``cfg.json`` + ``sae.safetensors``.

sparsify's sparse coder (SAE or, with ``transcode``, transcoder) computes

    pre = relu((x - b_dec·[not transcode]) @ encoder.weight.T + encoder.bias)
    top k of pre -> y = top_acts @ W_dec[top_indices] + b_dec

which is saelake's ``topk`` kind with W_enc = encoder.weight.T (relu then top-k keeps the same
values as top-k then relu). Hookpoints are the model's module names (``layers.5``, ``h.5.mlp``);
they map to TransformerLens hooks: a block's output is ``blocks.N.hook_resid_post``; a transcoder
on ``...N.mlp`` reads the MLP's input (``blocks.N.mlp.hook_in``) and writes its output
(``blocks.N.hook_mlp_out``); other names need ``--hook`` (and ``--out-hook``). Not expressible, so
refused: ``groupmax`` activations and skip connections (``W_skip``).
"""

from __future__ import annotations

import re
from pathlib import Path

from saelake.lake import UserError

from .. import dictionaries
from .common import Imported, need, read_json, read_tensors

FILES = ("cfg.json", "sae.safetensors")
_BLOCK = re.compile(r"^(?:.*\.)?(?:h|layers|layer|blocks)\.(\d+)(?:\.(mlp|attn|self_attn|attention))?$")


def is_sparsify(path: Path) -> bool:
    return all((path / f).is_file() for f in FILES)


def hookpoints(path: Path) -> list[str]:
    """Hookpoint folders under a sparsify run (``load_many``'s layout)."""
    return sorted(p.name for p in path.iterdir() if p.is_dir() and is_sparsify(p)) if path.is_dir() else []


def tl_hooks(hookpoint: str, transcode: bool) -> tuple[str, str] | None:
    """(in hook, out hook) in TransformerLens names for a sparsify hookpoint, or None."""
    m = _BLOCK.match(hookpoint)
    if not m:
        return None
    layer, part = m.group(1), m.group(2)
    if part is None:
        return None if transcode else (f"blocks.{layer}.hook_resid_post",) * 2
    if part == "mlp":
        return (
            (f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out")
            if transcode
            else (f"blocks.{layer}.hook_mlp_out",) * 2
        )
    return None if transcode else (f"blocks.{layer}.hook_attn_out",) * 2


def read_sparsify(path: Path, *, hook: str | None = None, out_hook: str | None = None) -> Imported:
    cfg = read_json(path / FILES[0])
    where = path / FILES[1]
    if cfg.get("activation", "topk") != "topk":
        raise UserError(
            f"{path}: activation {cfg.get('activation')!r}: only sparsify's topk coders can be imported "
            "(no saelake kind computes groupmax)"
        )
    transcode = bool(cfg.get("transcode", False))
    k = cfg.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise UserError(f"{path / FILES[0]}: k must be a positive integer, got {k!r}")
    w = read_tensors(where)
    if "W_skip" in w or cfg.get("skip_connection"):
        raise UserError(f"{path}: a sparse coder with a skip connection (W_skip): no saelake kind has one")
    need(w, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where)
    weights = {
        "W_enc": w["encoder.weight"].t().contiguous(),
        "b_enc": w["encoder.bias"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }
    mapped = tl_hooks(path.name, transcode)
    if (hook is None or (transcode and out_hook is None)) and mapped is None:
        raise UserError(
            f"{path}: hookpoint {path.name!r} has no known TransformerLens name: pass --hook"
            + (" and --out-hook" if transcode else "")
        )
    hook = hook or mapped[0]
    out_hook = out_hook or (mapped[1] if mapped and (transcode or hook == mapped[0]) else hook)
    return Imported(
        kind=dictionaries.get("topk"),
        weights=weights,
        options={"k": k},
        hooks=[hook],
        out_hooks=[out_hook],
        apply_b_dec_to_input=not transcode,
        source_format="sparsify",
        source_cfg=cfg | {"hookpoint": path.name},
        normalization={"method": "none", "folded": True},
    )
