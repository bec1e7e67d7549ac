"""``lake eval``: reconstruction metrics and, with the SAE spliced into the model at its out
hook(s), CE loss recovered, delta LM loss and KL (definitions: ``store.METRIC_DEFINITIONS``).

The splice is the interventions API's (``saelake.analyze.interventions.Splice``, error term
dropped): the reconstruction replaces the activations at every out hook, so transcoders and
multi-hook kinds are spliced too; a dictionary whose output at a hook depends on a later layer
(a crosscoder across layers) cannot be, and gets reconstruction metrics only.

Positions: BOS positions are excluded from every metric and never spliced; tokens whose norm
exceeds the SAE's ``outlier_factor`` x the hook's median norm (massive activations) are kept
clean too (not spliced, not counted in FVU/L0), as in training. Both are stated in the result.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from saelake.lake import Lake, SnapshotSource, UserError, documents, load_model, pack_contexts

from .config import SourceConfig, check_device
from .store import METRIC_DEFINITIONS, SAEStore, now


def _contexts(lake: Lake, cfg: dict, dataset: str | None, context_size: int | None, model, batch_size: int):
    """Token batches [b, T]: the snapshot's 2d contexts when it has them, else the corpus."""
    if dataset is None and cfg.get("run"):
        src = SnapshotSource(lake, cfg["run"], cfg.get("version"))
        if "contexts" in src.snapshot.tables:
            desc = f"snapshot {cfg['run']} v{src.version} contexts"
            return desc, (b.tokens.long() for b in src.context_batches(batch_size, [cfg["hooks"][0]]))
        dataset = src.manifest.dataset
        context_size = context_size or src.context_size
    dataset = dataset or cfg.get("dataset")
    if dataset is None:
        raise UserError("this SAE has no snapshot with contexts: give --dataset (and --model)")
    T = context_size or SourceConfig.context_size
    ctxs = pack_contexts(documents(dataset), model.tokenizer, T, model.bos_token_id)

    def gen():
        while True:
            chunk = list(itertools.islice(ctxs, batch_size))
            if not chunk:
                return
            yield torch.stack([torch.from_numpy(c.tokens).long() for c in chunk])

    return f"corpus {dataset}", gen()


EVAL_TOKENS = 16384  # default evaluation tokens (whole contexts)
EVAL_BATCH = 8  # default contexts per forward pass


@torch.no_grad()
def evaluate(
    lake: Lake | str,
    name: str,
    *,
    model: str | None = None,
    dataset: str | None = None,
    tokens: int = EVAL_TOKENS,
    batch_size: int = EVAL_BATCH,
    context_size: int | None = None,
    device: str = "cpu",
    save: bool = True,
) -> dict:
    check_device(device)
    lake = lake if isinstance(lake, Lake) else Lake(lake)
    store = SAEStore(lake)
    sae, cfg = store.load(name, device)
    if tokens <= 0:
        raise UserError(f"--tokens must be positive, got {tokens}")
    spec = model or cfg.get("model")
    if not spec:
        raise UserError(f"SAE {name!r} does not name its model: pass --model")
    lm = load_model(spec, device)
    hooks, out_hooks = cfg["hooks"], cfg["out_hooks"]
    lm.check_hooks(hooks + out_hooks)
    from saelake.analyze.interventions import Splice

    try:
        splice, unspliced = Splice(lm, sae, keep_error=False), None
    except UserError as e:  # a kind that reads a later layer than it writes
        splice, unspliced = None, str(e)
    desc, batches = _contexts(lake, cfg, dataset, context_size, lm, batch_size)
    bos = lm.bos_token_id
    norm = (cfg.get("normalization") or {}).get("hooks") or {}
    factor = cfg.get("outlier_factor")
    acc = {k: 0.0 for k in ("sq", "ysq", "n", "l0", "ce_clean", "ce_sae", "ce_zero", "kl", "npos")}
    ysum = None
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    seen = 0
    for toks in batches:
        if seen >= tokens:
            break
        toks = toks.to(device)
        keep = toks != bos  # [b, T]
        acts: dict[str, torch.Tensor] = {}
        capture = [
            (h, lambda t, hook, h=h, acts=acts: acts.__setitem__(h, t.detach().clone()))
            for h in dict.fromkeys(hooks + out_hooks)
        ]
        logits = lm.bridge.run_with_hooks(toks, fwd_hooks=capture, return_type="logits").float()
        for h in dict.fromkeys(hooks + out_hooks):
            if factor and h in norm:
                keep &= acts[h].float().norm(dim=-1) <= factor * norm[h]["median_norm"]
        y = torch.cat([acts[h] for h in out_hooks], -1).float()[keep]
        if sae.context_input:  # a kind that reads whole contexts (Lorsa) encodes them whole: kept positions scored
            codes, written = sae.reconstruct({h: a.float() for h, a in acts.items()})
            y_hat = torch.cat([written[h] for h in out_hooks], -1)[keep]
        else:
            codes = sae.encode(sae.read(acts).float()[keep])
            y_hat = sae.decode(codes)[0]
        acc["sq"] += float((y - y_hat).double().pow(2).sum())
        acc["ysq"] += float(y.double().pow(2).sum())
        ysum = y.double().sum(0) if ysum is None else ysum + y.double().sum(0)
        acc["n"] += len(y)
        acc["l0"] += float(codes.l0()[0]) * len(y)
        fired |= codes.fired()[0]
        seen += int(keep.sum())
        if splice is None:
            continue
        sae_logits = splice.logits(toks, mask=keep)

        def zero(t, hook, keep=keep):
            t = t.clone()
            t[keep] = 0
            return t

        zero_logits = lm.bridge.run_with_hooks(
            toks, fwd_hooks=[(h, zero) for h in out_hooks], return_type="logits"
        ).float()
        mask = toks[:, :-1] != bos  # losses at non-BOS positions only
        target = toks[:, 1:]

        def ce(lg, target=target, mask=mask):
            lp = F.log_softmax(lg[:, :-1], -1)
            return -(lp.gather(-1, target.unsqueeze(-1)).squeeze(-1))[mask].sum(), lp

        c_clean, lp_clean = ce(logits)
        c_sae, lp_sae = ce(sae_logits)
        c_zero, _ = ce(zero_logits)
        acc["ce_clean"] += float(c_clean)
        acc["ce_sae"] += float(c_sae)
        acc["ce_zero"] += float(c_zero)
        acc["kl"] += float((lp_clean.exp() * (lp_clean - lp_sae)).sum(-1)[mask].sum())
        acc["npos"] += int(mask.sum())
    if acc["n"] == 0:
        raise UserError(f"no evaluation tokens for SAE {name!r}: the source is empty")
    n = acc["n"]
    var = acc["ysq"] - float((ysum**2).sum()) / n
    res = {
        "sae": name,
        "tokens": int(n),
        "source": desc,
        "model": spec,
        "created": now(),
        "fvu": acc["sq"] / var,
        "l0": acc["l0"] / n,
        "dead_fraction": float((~fired).float().mean()),
        "dead_window_tokens": int(n),
        "bos_excluded": True,
        "outlier_factor": factor,
        "positions": "non-BOS tokens, norm <= outlier_factor x median norm (others are neither spliced nor "
        "counted in FVU/L0)",
    }
    res["explained_variance"] = 1 - res["fvu"]
    if splice is not None and acc["npos"]:
        p = acc["npos"]
        clean, sae_ce, zero = acc["ce_clean"] / p, acc["ce_sae"] / p, acc["ce_zero"] / p
        res |= {
            "ce_clean": clean,
            "ce_sae": sae_ce,
            "ce_zero_ablation": zero,
            "delta_lm_loss": sae_ce - clean,
            "kl": acc["kl"] / p,
            "ce_loss_recovered": (zero - sae_ce) / (zero - clean) if zero != clean else None,
            "ce_positions": p,
        }
    else:
        res["note"] = f"not spliced (reconstruction metrics only): {unspliced}"
    res["definitions"] = {k: METRIC_DEFINITIONS[k] for k in METRIC_DEFINITIONS if k in res}
    if save:
        cfg["eval"] = res
        metrics = [r for r in store.metrics(name) if not r["name"].startswith("eval_")]
        step = max([r["step"] for r in metrics], default=0)
        metrics += [
            {"step": step, "tokens": cfg.get("tokens_trained") or 0, "name": f"eval_{k}", "value": float(v)}
            for k, v in res.items()
            if k in ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "delta_lm_loss", "kl") and v is not None
        ]
        store.save(cfg, None, metrics)
    return res
