"""The held-out slice: rows of the source that training never reads, and the metrics on them.

Snapshot: the last ``tokens`` rows of the 1d table in storage order (the end of the snapshot: the
last ingest chunk(s); rows are shuffled within a chunk at ingest, so a held-out token's context may
also have trained tokens). Training reads rows ``0..n-tokens-1`` only, in every epoch of --repeat.
Live: the first ``tokens`` rows of the token stream; training starts after them.

Kinds that read whole contexts (Lorsa) hold out whole contexts instead: the last contexts of the 2d
table (live: the first contexts of the stream), as many as cover the requested tokens.

Default (one place): ``HOLDOUT_TOKENS`` tokens, but at most ``HOLDOUT_MAX_FRACTION`` of the snapshot
(live: of the training tokens); 0 disables the holdout. Metrics on the held-out rows are computed
like the in-sample ones (same normalised units, same outlier rule) with the final, saved weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch

from saelake.lake import UserError

from .store import sae_from_weights

HOLDOUT_TOKENS = 16384
HOLDOUT_MAX_FRACTION = 0.1
HOLDOUT_HELP = (
    f"Tokens held out of training and used for the final metrics (default {HOLDOUT_TOKENS}, at most "
    f"{HOLDOUT_MAX_FRACTION:.0%} of the snapshot / of --tokens live; 0: none, in-sample numbers only)."
)


@dataclass(frozen=True)
class Holdout:
    tokens: int  # held-out rows (0: no holdout); contexts: held-out contexts
    rows: tuple[int, int] | None  # snapshot: 1d table rows (contexts: 2d rows) [lo, hi) held out; live / none: None
    n_rows: int | None  # snapshot: rows of its 1d table (contexts: of its 2d table)
    context_size: int | None = None  # set: the unit is whole contexts of this many tokens

    @property
    def train_rows(self) -> int | None:
        """Snapshot rows training may read (None: live)."""
        return None if self.n_rows is None else self.n_rows - self.tokens

    def record(self) -> dict:
        if not self.tokens:
            return {"tokens": 0, "rule": "none: every metric is in-sample"}
        if self.context_size:
            T, n = self.context_size, self.tokens
            where = (
                f"the last {n} contexts of the snapshot's 2d table (rows {self.rows[0]}..{self.rows[1] - 1})"
                if self.rows
                else f"live: the first {n} contexts of the stream (training starts after them)"
            )
            return {
                "tokens": n * T,
                "contexts": n,
                **({"rows": list(self.rows)} if self.rows else {}),
                "rule": f"{where}; training never reads them",
            }
        if self.rows is None:
            return {
                "tokens": self.tokens,
                "rule": f"live: the first {self.tokens} tokens of the stream (training starts after them)",
            }
        return {
            "tokens": self.tokens,
            "rows": list(self.rows),
            "rule": f"the last {self.tokens} rows of the snapshot's 1d table in storage order (rows "
            f"{self.rows[0]}..{self.rows[1] - 1}); training never reads them",
        }


def plan(requested: int | None, *, n_rows: int | None, train_tokens: int, context_size: int | None = None) -> Holdout:
    """The holdout for a source: ``n_rows`` rows of a snapshot's 1d table, or None (live). With
    ``context_size``: in whole contexts (``n_rows``: of the 2d table), enough to cover the tokens."""
    if requested is not None and requested < 0:
        raise UserError(f"--holdout is a number of tokens (0: none), got {requested}")
    T = context_size or 1
    if requested is None:
        base = train_tokens if n_rows is None else n_rows * T
        requested = min(HOLDOUT_TOKENS, int(base * HOLDOUT_MAX_FRACTION))
    requested = -(-requested // T)  # tokens -> contexts (rounded up)
    if n_rows is None:
        return Holdout(requested, None, None, context_size)
    if requested and requested >= n_rows:
        raise UserError(
            f"--holdout {requested * T} leaves nothing to train on: the snapshot has {n_rows * T} "
            "tokens" + (f" ({n_rows} contexts)" if context_size else "")
        )
    return Holdout(requested, (n_rows - requested, n_rows) if requested else None, n_rows, context_size)


def training_batches(
    source,
    h: Holdout,
    batch_size: int,
    hooks: list[str],
    *,
    seed: int,
    start: int,
    repeat: bool,
    shard: tuple[int, int],
) -> Iterator:
    """The training stream without the held-out rows; ``start`` counts training rows (resume). For
    contexts: ``batch_size`` contexts per batch, in order, ``start`` counts contexts (one rank)."""
    if h.context_size:
        return _contexts(source, h, batch_size, hooks, start, repeat)
    if h.n_rows is None:  # live: the held-out rows are the stream's first
        return source.token_batches(batch_size, hooks, seed=seed, start=h.tokens + start, repeat=repeat, shard=shard)
    extra = {"rows": (0, h.train_rows)} if h.tokens else {}
    return source.token_batches(batch_size, hooks, seed=seed, start=start, repeat=repeat, shard=shard, **extra)


def heldout_batches(source, h: Holdout, batch_size: int, hooks: list[str], *, seed: int) -> Iterator:
    """The held-out rows, once (nothing when there is no holdout)."""
    if not h.tokens:
        return iter(())
    if h.context_size:
        return _first_contexts(source.context_batches(batch_size, hooks, start=h.rows[0] if h.rows else 0), h.tokens)
    if h.n_rows is not None:
        return source.token_batches(batch_size, hooks, seed=seed, rows=h.rows)
    return _first_rows(source.token_batches(batch_size, hooks, seed=seed), h.tokens)


def _contexts(source, h: Holdout, batch_size: int, hooks: list[str], start: int, repeat: bool) -> Iterator:
    """Training contexts: live, after the held-out first ones; a snapshot, its 2d rows before the held-out
    tail, epoch after epoch with ``repeat``."""
    if h.n_rows is None:
        yield from source.context_batches(batch_size, hooks, start=h.tokens + start)
        return
    n = h.train_rows
    while True:
        at = start % n
        yield from _first_contexts(source.context_batches(batch_size, hooks, start=at), n - at)
        start += n - at
        if not repeat:
            return


def _first_contexts(batches: Iterable, n: int) -> Iterator:
    for b in batches:
        if n <= 0:
            return
        if len(b) > n:
            b = type(b)({k: a[:n] for k, a in b.acts.items()}, b.tokens[:n], b.context_id[:n], b.doc_id[:n])
        n -= len(b)
        yield b


def _first_rows(batches: Iterable, n: int) -> Iterator:
    for b in batches:
        if n <= 0:
            return
        if len(b) > n:
            b = type(b)({k: a[:n] for k, a in b.acts.items()}, b.token_id[:n], b.context_id[:n], b.position[:n])
        n -= len(b)
        yield b


@dataclass
class Member:
    """One trained SAE as the held-out pass needs it: its saved (folded) model, hooks and scales."""

    name: str
    model: object  # SparseCoder taking raw activations
    hooks: list[str]
    out_hooks: list[str]
    scale_out: torch.Tensor  # [d_out]: raw -> normalised units (ones when normalize = "none")
    outlier_limits: dict[str, float]  # hook -> max norm kept (empty: keep all)


def member(s, apply_b_dec_to_input: bool, weights: dict, scale_out: torch.Tensor, norm: dict, device: str) -> Member:
    """An SAE of the sweep (its ``SAEConfig`` ``s`` and folded ``weights``) for the held-out pass,
    with the training's outlier rule (``norm``: per hook median norm)."""
    cfg = {
        "arch": s.arch,
        "hooks": s.hooks,
        "out_hooks": s.all_out_hooks,
        "hyperparameters": asdict(s),
        "apply_b_dec_to_input": apply_b_dec_to_input,
    }
    limits = (
        {h: s.outlier_factor * norm[h]["median_norm"] for h in dict.fromkeys(s.hooks + s.all_out_hooks)}
        if s.outlier_factor is not None
        else {}
    )
    return Member(
        s.name, sae_from_weights(cfg, weights, device), s.hooks, s.all_out_hooks, scale_out.to(device), limits
    )


@torch.no_grad()
def evaluate(members: list[Member], batches: Iterable, device: str, bos: int | None = None) -> dict[str, dict]:
    """Per member: FVU (normalised units; per out hook too when it has several), L0 and dead
    fraction on the held-out rows, and the tokens they cover (after the outlier rule). Whole
    contexts (kinds that read them) are encoded whole; their ``bos`` positions are not counted."""
    acc = {
        m.name: {
            "sq": 0.0,
            "ysq": 0.0,
            "ysum": None,
            "n": 0,
            "l0": 0.0,
            "fired": None,
            "sq_col": 0.0,
            "ysq_col": 0.0,
            "widths": None,
        }
        for m in members
    }
    for batch in batches:
        raw = {h: a.to(device, torch.float32) for h, a in batch.acts.items()}
        tokens = getattr(batch, "tokens", None)  # a ContextBatch: whole contexts [b, T, d]
        for m in members:
            keep = (
                (tokens.to(device) != bos)
                if tokens is not None
                else torch.ones(len(batch), dtype=torch.bool, device=device)
            )
            for h, limit in m.outlier_limits.items():
                keep &= torch.linalg.vector_norm(raw[h], dim=-1) <= limit
            y = torch.cat([raw[h] for h in m.out_hooks], -1)[keep]
            if not len(y):
                continue
            if tokens is not None:
                codes, written = m.model.reconstruct(raw)
                y_hat = torch.cat([written[h] for h in m.out_hooks], -1)[keep]
            else:
                codes = m.model.encode(torch.cat([raw[h] for h in m.hooks], -1)[keep])
                y_hat = m.model.decode(codes)[0]
            err = ((y - y_hat) * m.scale_out).double()
            yn = (y * m.scale_out).double()
            a = acc[m.name]
            a["sq"] += float(err.pow(2).sum())
            a["ysq"] += float(yn.pow(2).sum())
            a["ysum"] = yn.sum(0) if a["ysum"] is None else a["ysum"] + yn.sum(0)
            if len(m.out_hooks) > 1:  # per column, summed per out hook at the end
                a["sq_col"] = a["sq_col"] + err.pow(2).sum(0)
                a["ysq_col"] = a["ysq_col"] + yn.pow(2).sum(0)
                a["widths"] = [raw[h].shape[-1] for h in m.out_hooks]
            a["n"] += len(y)
            a["l0"] += float(codes.l0()[0]) * len(y)
            fired = codes.fired()[0]
            a["fired"] = fired if a["fired"] is None else a["fired"] | fired
    out = {}
    for m in members:
        a = acc[m.name]
        n = a["n"]
        var = a["ysq"] - float((a["ysum"] ** 2).sum()) / n if n else 0.0
        out[m.name] = {
            "tokens": n,
            "fvu": a["sq"] / var if var > 0 else None,
            "l0": a["l0"] / n if n else None,
            "dead_fraction": float((~a["fired"]).float().mean()) if n else None,
        }
        if a["widths"] and n:
            sq = a["sq_col"].split(a["widths"])
            var_col = (a["ysq_col"] - a["ysum"] ** 2 / n).split(a["widths"])
            out[m.name]["fvu_per_hook"] = {
                h: float(e.sum() / v.sum()) if float(v.sum()) > 0 else None for h, e, v in zip(m.out_hooks, sq, var_col)
            }
    return out
