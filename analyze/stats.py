"""Streaming per-feature statistics and samples, vectorised over features.

``FeatureStats.update`` takes one batch of whole contexts (their SAE latents) and updates,
for every feature at once with torch ops on ``[tokens, d_sae]``:

- ``count``: tokens where the feature is > 0, over *valid* tokens only. Valid = not BOS
  (position 0 and the document separators the packer inserts) and not the tokenizer's pad
  token. Invalid positions are zeroed before anything else, so they never count, never set
  a max and never show as activating in a sample. ``density = count / valid tokens``.
- ``max`` and ``mean`` (mean of the non-zero activations), summed in float64.
- a histogram of the non-zero activations in fixed quarter-octave bins (``hist_edges``):
  bin 0 is (0, 2^-20), then [2^(-20 + i/4), 2^(-20 + (i+1)/4)) up to 2^20, then [2^20, inf).
- ``top``: the ``top_k`` contexts with the largest context max (max over the context's valid
  tokens), exact: each batch's candidates are merged into a [d_sae, top_k] buffer with one
  ``topk``. Ties between equal maxima are broken arbitrarily.
- ``intervals`` (p_1 > p_2 > ... e.g. 0.8, 0.6, 0.4): interval j holds contexts whose max
  lies in [p_{j+1}·M, p_j·M) with p_0 = 1 (top interval closed) and M the feature's max. The
  rule, exactly: before a batch is merged, M becomes the running max including that batch;
  the candidates are the stored samples plus the batch's activating contexts, each placed in
  the interval its max falls in relative to that M (or dropped when below the last bound);
  each interval keeps the ``per_interval`` candidates of lowest ``priority`` (a fixed hash of
  context id, feature and seed: a deterministic pseudo-random choice). Dropped contexts are
  never reconsidered. So every stored sample obeys the interval bounds of the final max, and
  the choice is a uniform sample of the interval when the max was reached before the
  interval's contexts went by; when the max rises late, an interval can hold fewer samples.
  Interval samples may also appear among the top contexts.
- ``zero``: ``n_zero`` non-activating contexts (the feature is 0 on every valid token), the
  ones of lowest priority.

Memory is bounded by d_sae x (top_k + intervals x per_interval) x context size (the per-token
activations of the held samples) plus the tokens of the contexts they reference: flat in the
number of tokens analysed.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import numpy as np
import torch

HIST_LO, HIST_HI, HIST_PER_OCTAVE = -20, 20, 4
HIST_BINS = (HIST_HI - HIST_LO) * HIST_PER_OCTAVE + 2
NEG = float("-inf")


def hist_edges() -> torch.Tensor:
    """[HIST_BINS + 1] bin edges: 0, 2^-20, 2^(-20 + 1/4), ..., 2^20, inf."""
    inner = 2.0 ** (
        HIST_LO + torch.arange((HIST_HI - HIST_LO) * HIST_PER_OCTAVE + 1, dtype=torch.float64) / HIST_PER_OCTAVE
    )
    return torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.full((1,), math.inf, dtype=torch.float64)])


def hist_bin(v: torch.Tensor) -> torch.Tensor:
    """Bin index of positive activations (see ``hist_edges``)."""
    b = torch.floor((torch.log2(v.double()) - HIST_LO) * HIST_PER_OCTAVE).long() + 1
    return b.clamp_(0, HIST_BINS - 1)


ANALYZE_THREADS = int(os.environ.get("SAELAKE_ANALYZE_THREADS", "0"))  # 0: torch's own count


@contextmanager
def bookkeeping_threads():
    """Threads for the bookkeeping's many small ops: torch's own count, or SAELAKE_ANALYZE_THREADS.

    On a free machine all threads are fastest (2 cores: the update 1.7-1.8x faster than on one).
    Where the cores are shared with other busy processes, OpenMP hand-offs can make these small
    ops up to 100x slower: there, set SAELAKE_ANALYZE_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(ANALYZE_THREADS or threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def priority(ctx: torch.Tensor, features: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A deterministic hash of (context id, feature, seed) in [0, 1): [len(features), len(ctx)]."""
    m32 = 0xFFFFFFFF
    x = (
        (ctx.long() & m32)[None, :] * 0x7FEB352D + features.long()[:, None] * 0x6C8E9CF5 + (seed * 0x27D4EB2F & m32)
    ) & m32
    for shift, mult in ((16, 0x7FEB352D), (15, 0x46C8A68B), (16, None)):
        x = x ^ (x >> shift)
        if mult:
            x = (x * mult) & m32
    return x.double() / 2.0**32


class Slots:
    """Per-feature sample slots: [S, C] context ids/values/priorities, optional [S, C, T] acts."""

    def __init__(self, S: int, C: int, T: int, with_acts: bool):
        self.ctx = torch.full((S, C), -1, dtype=torch.long)
        self.val = torch.zeros(S, C)  # context max of the feature
        self.u = torch.full((S, C), math.inf, dtype=torch.float64)  # priority
        self.acts = torch.zeros(S, C, T) if with_acts else None

    @property
    def used(self) -> torch.Tensor:
        return self.ctx >= 0

    def refill(
        self,
        keep_old: torch.Tensor,
        keep_new: torch.Tensor,
        batch_ctx: torch.Tensor,
        cval: torch.Tensor,
        cu: torch.Tensor,
        acts_of=None,
    ) -> torch.Tensor:
        """Keep ``keep_old`` slots; move the batch candidates ``keep_new`` [S, n] into freed slots.

        ``cval``/``cu`` [S, n]: the candidates' context max and priority; ``acts_of(features,
        contexts)`` -> [m, T]: per-token activations of the new samples. Returns the batch context
        indices now referenced."""
        self.ctx[~keep_old] = -1
        C, n = keep_old.shape[1], keep_new.shape[1]
        if C == 0:
            return torch.zeros(0, dtype=torch.long)
        free = torch.argsort(keep_old.to(torch.int8), dim=1, stable=True)  # free slots first
        new = torch.argsort((~keep_new).to(torch.int8), dim=1, stable=True)  # kept candidates first
        R = min(C, n)
        fi, r = (torch.arange(R)[None, :] < keep_new.sum(1, keepdim=True)).nonzero(as_tuple=True)
        slot, src = free[fi, r], new[fi, r]
        self.ctx[fi, slot] = batch_ctx[src]
        self.val[fi, slot] = cval[fi, src]
        self.u[fi, slot] = cu[fi, src]
        if self.acts is not None and len(fi):
            self.acts[fi, slot] = acts_of(fi, src)
        return src.unique()


class _PerToken:
    """Per-token activations [m, T] of (feature, context) pairs of a batch, scattered straight
    from the batch's non-zero entries: O(entries + m·T), never a dense [S, n·T] copy."""

    def __init__(self, rows, lat, vals, n, T, S):
        self.pair = lat * n + torch.div(rows, T, rounding_mode="floor")  # (feature, context) of each entry
        self.pos, self.vals, self.shape = rows % T, vals, (n, T, S)

    def __call__(self, fi: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        n, T, S = self.shape
        slot = torch.full((S * n,), -1, dtype=torch.long)
        slot[fi * n + src] = torch.arange(len(fi))
        p = slot[self.pair]
        hit = p >= 0
        out = torch.zeros(len(fi), T)
        out[p[hit], self.pos[hit]] = self.vals[hit]
        return out


class FeatureStats:
    def __init__(
        self,
        d_sae: int,
        context_size: int,
        *,
        top_k: int = 20,
        intervals=(0.8, 0.6, 0.4),
        per_interval: int = 5,
        n_zero: int = 5,
        seed: int = 0,
    ):
        S, T = d_sae, context_size
        self.S, self.T, self.seed = S, T, seed
        self.intervals = [float(p) for p in intervals]
        if any(not 0 < p < 1 for p in self.intervals) or self.intervals != sorted(self.intervals, reverse=True):
            raise ValueError(f"intervals must be decreasing fractions in (0, 1), got {intervals}")
        self.top_k, self.per_interval, self.n_zero = top_k, per_interval, n_zero
        self.features = torch.arange(S)
        self.count = torch.zeros(S, dtype=torch.long)
        self.total = torch.zeros(S, dtype=torch.float64)
        self.max = torch.zeros(S)
        self.hist = torch.zeros(S * HIST_BINS, dtype=torch.long)
        self.n_valid = self.n_tokens = self.n_contexts = 0
        self.top = Slots(S, top_k, T, True)
        self.top.val.fill_(NEG)
        self.inter = Slots(S, len(self.intervals) * per_interval, T, True)
        self.zero = Slots(S, n_zero, T, False)
        self.contexts: dict[int, tuple[np.ndarray, int]] = {}  # context id -> (tokens, doc id)
        self._batches = 0

    # -- one batch ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self,
        rows: torch.Tensor,
        lat: torch.Tensor,
        vals: torch.Tensor,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        context_id: torch.Tensor,
        doc_id: torch.Tensor,
    ) -> None:
        """One batch of n whole contexts: non-zero latents (``rows`` = context·T + position,
        ``lat``, ``vals``) already restricted to valid tokens; ``tokens`` [n, T]; ``valid`` [n, T].
        Thread count: see ``bookkeeping_threads``."""
        with bookkeeping_threads():
            self._update(rows, lat, vals, tokens, valid, context_id, doc_id)

    def _update(self, rows, lat, vals, tokens, valid, context_id, doc_id) -> None:
        n, T, S = tokens.shape[0], self.T, self.S
        self.n_tokens += n * T
        self.n_valid += int(valid.sum())
        self.n_contexts += n
        # scalar statistics from the sparse entries
        self.count += torch.bincount(lat, minlength=S)
        self.total.index_add_(0, lat, vals.double())
        self.max.scatter_reduce_(0, lat, vals, "amax")
        self.hist += torch.bincount(lat * HIST_BINS + hist_bin(vals), minlength=S * HIST_BINS)
        # context max per feature, and the per-token latents of new samples
        cmax = torch.zeros(n * S).scatter_reduce_(0, (rows // T) * S + lat, vals, "amax").view(n, S).t()  # [S, n]
        f = _PerToken(rows, lat, vals, n, T, S)
        cu = priority(context_id, self.features, self.seed)  # [S, n]
        used = [
            self._update_top(cmax, context_id, cu, f),
            self._update_intervals(cmax, context_id, cu, f),
            self._update_zero(cmax, context_id, cu),
        ]
        for i in torch.cat(used).unique().tolist():
            self.contexts[int(context_id[i])] = (tokens[i].numpy().copy(), int(doc_id[i]))
        self._batches += 1
        if self._batches % 16 == 0:
            self._prune()

    def _update_top(self, cmax, ctx, cu, f):
        K = self.top_k
        cand = torch.where(cmax > 0, cmax, NEG)
        allv = torch.cat([self.top.val, cand], 1)
        sel = allv.topk(K, dim=1).indices
        keep = torch.zeros_like(allv, dtype=torch.bool).scatter_(1, sel, True) & (allv > NEG)
        refs = self.top.refill(keep[:, :K], keep[:, K:], ctx, cmax, cu, f)
        self.top.val[~self.top.used] = NEG
        return refs

    def _interval_of(self, v: torch.Tensor, M: torch.Tensor | None = None) -> torch.Tensor:
        """Interval index of context maxima ``v`` [S, m] relative to the running max; -1 = none."""
        M = self.max if M is None else M
        j = torch.full(v.shape, -1, dtype=torch.long)
        for i, p in reversed(list(enumerate(self.intervals))):  # smallest bound first, overwritten upward
            j[(v >= p * M[:, None]) & (v > 0)] = i
        return j

    def _update_intervals(self, cmax, ctx, cu, f):
        C = self.inter.ctx.shape[1]
        v = torch.cat([torch.where(self.inter.used, self.inter.val, 0.0), cmax], 1)
        u = torch.cat([self.inter.u, cu], 1)
        j = self._interval_of(v)
        key = torch.where(j >= 0, j.double() + u, math.inf)
        skey, order = key.sort(dim=1, stable=True)
        group = torch.where(torch.isfinite(skey), skey.floor(), -1.0)
        pos = torch.arange(key.shape[1]).expand_as(key)
        start = (
            torch.where(
                torch.cat([torch.ones_like(group[:, :1], dtype=torch.bool), group[:, 1:] != group[:, :-1]], 1), pos, 0
            )
            .cummax(1)
            .values
        )
        kept_sorted = (pos - start < self.per_interval) & torch.isfinite(skey)
        keep = torch.zeros_like(kept_sorted).scatter_(1, order, kept_sorted)
        return self.inter.refill(keep[:, :C], keep[:, C:], ctx, cmax, cu, f)

    def _update_zero(self, cmax, ctx, cu):
        Z = self.n_zero
        if Z == 0:
            return torch.zeros(0, dtype=torch.long)
        cand = torch.where(cmax == 0, -cu, NEG)
        allk = torch.cat([torch.where(self.zero.used, -self.zero.u, NEG), cand], 1)
        sel = allk.topk(min(Z, allk.shape[1]), dim=1).indices
        keep = torch.zeros_like(allk, dtype=torch.bool).scatter_(1, sel, True) & (allk > NEG)
        return self.zero.refill(keep[:, :Z], keep[:, Z:], ctx, cmax, cu)

    def finish(self) -> None:
        """Drop the tokens of contexts no sample references any more."""
        self._prune()

    def _prune(self) -> None:
        live = set(torch.cat([s.ctx[s.used] for s in (self.top, self.inter, self.zero)]).unique().tolist())
        self.contexts = {c: v for c, v in self.contexts.items() if c in live}

    # -- results -----------------------------------------------------------------------------
    def scalars(self) -> dict[str, torch.Tensor]:
        mean = torch.where(self.count > 0, self.total / self.count.clamp_min(1), 0.0)
        return {
            "count": self.count,
            "density": self.count.double() / max(self.n_valid, 1),
            "max_act": self.max,
            "mean_act": mean.float(),
        }

    def samples(self, f0: int = 0, f1: int | None = None) -> dict[str, torch.Tensor]:
        """Every held sample, ordered per feature: top (by max, descending), then each interval
        (by max, descending), then non-activating (by priority). Tensors are [F, C_all] (``ctx`` -1
        = empty) plus ``acts`` [F, C_all, T], for features f0..f1."""
        sl = slice(f0, f1)
        top, inter, zero = self.top, self.inter, self.zero
        ti = torch.full_like(top.ctx[sl], -1)
        tj = self._interval_of(torch.where(inter.used[sl], inter.val[sl], 0.0), self.max[sl])
        kind = torch.cat(
            [torch.zeros_like(top.ctx[sl]), torch.ones_like(inter.ctx[sl]), torch.full_like(zero.ctx[sl], 2)], 1
        )
        interval = torch.cat([ti, tj, torch.full_like(zero.ctx[sl], -1)], 1)
        ctx = torch.cat([top.ctx[sl], inter.ctx[sl], zero.ctx[sl]], 1)
        val = torch.cat([top.val[sl], inter.val[sl], torch.zeros_like(zero.val[sl])], 1)
        u = torch.cat([top.u[sl], inter.u[sl], zero.u[sl]], 1)
        sub = torch.where(kind == 2, u, -val.double())
        key = torch.where(ctx >= 0, kind * 1e6 + interval.clamp_min(0) * 1e3, math.inf)
        order = torch.from_numpy(np.lexsort((sub.numpy(), key.numpy()), axis=1))
        acts = torch.cat([top.acts[sl], inter.acts[sl], torch.zeros(len(ctx), self.n_zero, self.T)], 1)
        g = lambda t: t.gather(1, order)  # noqa: E731
        return {
            "kind": g(kind),
            "interval": g(interval),
            "ctx": g(ctx),
            "val": g(torch.where(ctx >= 0, val, 0.0)),
            "acts": acts.gather(1, order[:, :, None].expand(-1, -1, self.T)),
        }
