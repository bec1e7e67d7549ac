"""What a feature page shows for the bigger dictionaries, beside what every feature has:

- several out hooks (a CLT's output layers, a crosscoder's models): the feature's decoder norm into each
  and its share (from the analysis: ``decoder_norms`` in the record's ``out_hooks`` order);
- a kind whose latents attend (Lorsa's heads): on each top example, where the head attends from the
  peak position: the head's attention pattern computed on the context's stored input (2d snapshot).
"""

from __future__ import annotations

import torch

from saelake.lake import Lake, SnapshotSource, UserError


def decoder_norm_rows(rec: dict, feat: dict) -> list[tuple[str, float, float]]:
    """[(out hook, decoder norm, share of the total)]; empty for one out hook or older analyses."""
    norms, hooks = feat.get("decoder_norms") or [], rec.get("out_hooks") or []
    total = sum(norms) or 1.0
    return [(h, v, v / total) for h, v in zip(hooks, norms)] if len(norms) > 1 else []


@torch.no_grad()
def attention_rows(
    lake: Lake, cfg: dict, rec: dict, feature: int, samples: list[dict], n: int = 6
) -> dict[int, tuple[int, list[tuple[int, float]]]]:
    """Per top sample (context id): (peak position, the ``n`` positions the head attends to most from
    there, with their weights). Empty when the kind does not attend or the contexts are not stored."""
    from saelake.train import SAEStore, dictionaries

    if not dictionaries.get(cfg["arch"]).attends or not rec.get("run") or not samples:
        return {}
    try:
        sae, _ = SAEStore(lake).load(cfg["name"])
        src = SnapshotSource(lake, rec["run"], rec.get("version"))
    except UserError:
        return {}
    if "contexts" not in src.snapshot.tables:
        return {}
    out = {}
    for s in samples:
        if not s["acts"]:
            continue
        peak = s["positions"][max(range(len(s["acts"])), key=s["acts"].__getitem__)]
        batch = next(src.context_batches(1, sae.hooks, start=int(s["context_id"])), None)
        if batch is None or int(batch.context_id[0]) != int(s["context_id"]):
            continue
        x = sae.read({h: batch.acts[h][0].float() for h in sae.hooks})
        row = sae.attention(x, feature)[peak]
        top = row.topk(min(n, peak + 1))
        out[int(s["context_id"])] = (peak, [(int(i), float(w)) for i, w in zip(top.indices, top.values)])
    return out
