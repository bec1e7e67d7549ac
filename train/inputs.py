"""From a source's batch to what each group of a sweep trains on: hook activations in float32,
normalised once per batch (dataset-wise: E|x| = sqrt(d) per hook), the outlier rule applied once per
input setting, and, for kinds that read whole contexts, which positions the loss counts (not BOS).
"""

from __future__ import annotations

import math

import torch


def norm_stats(batch, stats: dict | None, d_model: dict[str, int], bos: int | None) -> dict:
    """Per hook: scale (so E|x| = sqrt(d)) and outlier limit, from ingest ``stats`` or, live, from the
    first batch (whole contexts: their ``bos`` positions, massive activations, left out as ingest does)."""
    origin = "ingest"
    if stats is None:
        origin = "first live batch"
        stats = {}
        for h in d_model:
            norms = batch.acts[h].float().norm(dim=-1)
            if bos is not None:
                norms = norms[batch.tokens != bos]
            stats[h] = {"mean_norm": float(norms.mean()), "median_norm": float(norms.median())}
    return {
        h: {
            "mean_norm": stats[h]["mean_norm"],
            "median_norm": stats[h]["median_norm"],
            "scale": math.sqrt(d_model[h]) / stats[h]["mean_norm"],
            "origin": origin,
        }
        for h in d_model
    }


@torch.no_grad()
def group_inputs(batch, n_take: int, norm: dict, groups: list, hooks: list[str], device: str, bos: int | None) -> dict:
    """Per distinct input setting of the groups: (x, y, rows). Each hook is converted to fp32 and
    normalised once per batch, whatever the number of SAEs; outliers are dropped once per setting.
    Token batches: ``x``, ``y`` hold the kept tokens (``rows`` None). Whole contexts (``bos`` given):
    ``x`` is every context whole, ``y`` the kept positions and ``rows`` which ones they are."""
    raw, scaled, norms, out = {}, {}, {}, {}
    need_raw = any(g.cfg.normalize == "none" for g in groups)
    for h in hooks:
        a = batch.acts[h][:n_take].to(device, torch.float32)
        norms[h] = torch.linalg.vector_norm(a, dim=-1)
        raw[h] = a
        scaled[h] = a * norm[h]["scale"] if need_raw else a.mul_(norm[h]["scale"])  # `a`: a fresh copy
    for g in groups:
        c = g.cfg
        key = g.input_key
        if key in out:
            continue
        xn = raw if c.normalize == "none" else scaled
        keep = None
        if c.outlier_factor is not None:
            for h in dict.fromkeys(c.hooks + c.all_out_hooks):
                ok = norms[h] <= c.outlier_factor * norm[h]["median_norm"]
                keep = ok if keep is None else keep & ok
        x = g.model.read(xn)  # the dictionary's input and target: its kind knows its hooks
        if bos is not None:  # whole contexts in, every position out; the loss counts the kept ones
            rows = batch.tokens[:n_take].to(device) != bos
            rows = (rows if keep is None else rows & keep).reshape(-1)
            out[key] = (x, g.model.target(xn)[rows], rows)
            continue
        same = c.all_out_hooks == c.hooks
        y = x if same else g.model.target(xn)
        if keep is not None and not bool(keep.all()):
            x = x[keep]
            y = x if same else y[keep]
        out[key] = (x, y, None)
    return out


@torch.no_grad()
def init_from_data(groups: list, batch, norm: dict, device: str) -> None:
    """Each group's data-dependent init (its kind's ``init_from_data``: the SAE family's b_dec) from the
    first batch's targets."""
    for g in groups:
        c = g.cfg
        y = g.model.target(
            {
                h: batch.acts[h].to(device, torch.float32) * (norm[h]["scale"] if c.normalize != "none" else 1.0)
                for h in c.all_out_hooks
            }
        )
        g.model.init_from_data(y, c.b_dec_init)
