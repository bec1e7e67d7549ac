"""The feature table: one row per feature, built column-wise from the statistics' tensors.

Both stores hold exactly these fields (MongoDB adds ``sae`` and ``analysis`` to each document):

    feature int32, count int64, density float64, max_act float32, mean_act float32,
    hist_edges list<float32>, hist_counts list<int64>        (non-empty bin range only)
    pos_tokens list<int32>, pos_strs list<string>, pos_logits list<float32>   (top output tokens)
    neg_tokens list<int32>, neg_strs list<string>, neg_logits list<float32>   (bottom ones)
    neighbours list<int32>, neighbour_cos list<float32>
    decoder_norms list<float32>     (the decoder's norm into each out hook, in the record's ``out_hooks``
                                     order; empty for one out hook)
    samples list<struct<kind string (top|interval|zero), interval int32 (-1 unless interval),
                        context_id int64, doc_id int64, max_act float32, tokens list<int32>,
                        strs list<string>, positions list<int32>, acts list<float32>>>
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from .stats import FeatureStats, hist_edges

KINDS = ("top", "interval", "zero")
SAMPLE = pa.struct(
    [
        ("kind", pa.string()),
        ("interval", pa.int32()),
        ("context_id", pa.int64()),
        ("doc_id", pa.int64()),
        ("max_act", pa.float32()),
        ("tokens", pa.list_(pa.int32())),
        ("strs", pa.list_(pa.string())),
        ("positions", pa.list_(pa.int32())),
        ("acts", pa.list_(pa.float32())),
    ]
)
SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("count", pa.int64()),
        ("density", pa.float64()),
        ("max_act", pa.float32()),
        ("mean_act", pa.float32()),
        ("hist_edges", pa.list_(pa.float32())),
        ("hist_counts", pa.list_(pa.int64())),
        ("pos_tokens", pa.list_(pa.int32())),
        ("pos_strs", pa.list_(pa.string())),
        ("pos_logits", pa.list_(pa.float32())),
        ("neg_tokens", pa.list_(pa.int32())),
        ("neg_strs", pa.list_(pa.string())),
        ("neg_logits", pa.list_(pa.float32())),
        ("neighbours", pa.list_(pa.int32())),
        ("neighbour_cos", pa.list_(pa.float32())),
        ("decoder_norms", pa.list_(pa.float32())),
        ("samples", pa.list_(SAMPLE)),
    ]
)
SCALARS = ["feature", "count", "density", "max_act", "mean_act"]


def _lists(values: pa.Array, lengths: np.ndarray, typ: pa.DataType | None = None) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=pa.list_(typ) if typ else None)


def _fixed(t: torch.Tensor | None, rows: int, typ) -> pa.Array:
    """[F, n] tensor -> list<typ> column (empty lists when absent)."""
    if t is None:
        return _lists(pa.array([], typ), np.zeros(rows, np.int64), typ)
    return _lists(pa.array(t.reshape(-1).numpy(), typ), np.full(rows, t.shape[1]), typ)


def _strs(vocab: pa.Array, ids: torch.Tensor | np.ndarray, rows: int, width: int | None = None) -> pa.Array:
    ids = np.asarray(ids).reshape(-1)
    vals = vocab.take(pa.array(ids.astype(np.int64)))
    return _lists(vals, np.full(rows, width if width is not None else len(ids) // max(rows, 1)), pa.string())


class FeatureTable:
    """Builds record batches of ``chunk`` features from finished statistics."""

    def __init__(
        self,
        stats: FeatureStats,
        vocab: list[str],
        logits=None,
        neighbours=None,
        chunk: int = 512,
        decoder_norms: torch.Tensor | None = None,
    ):
        stats.finish()
        self.stats, self.chunk, self.decoder_norms = stats, chunk, decoder_norms
        self.vocab = pa.array(vocab, pa.string())
        self.logits, self.neighbours = logits, neighbours
        self.edges = hist_edges().float()
        ids = sorted(stats.contexts)
        self.ctx_ids = torch.tensor(ids, dtype=torch.long)
        T = stats.T
        self.ctx_tokens = (
            torch.from_numpy(np.stack([stats.contexts[c][0] for c in ids]))
            if ids
            else torch.zeros(0, T, dtype=torch.int32)
        )
        self.ctx_docs = torch.tensor([stats.contexts[c][1] for c in ids], dtype=torch.long)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        for f0 in range(0, self.stats.S, self.chunk):
            yield self.batch(f0, min(f0 + self.chunk, self.stats.S))

    def batch(self, f0: int, f1: int) -> pa.RecordBatch:
        st, F = self.stats, f1 - f0
        sc = {k: v[f0:f1] for k, v in st.scalars().items()}
        cols = {
            "feature": pa.array(np.arange(f0, f1, dtype=np.int32)),
            "count": pa.array(sc["count"].numpy()),
            "density": pa.array(sc["density"].numpy()),
            "max_act": pa.array(sc["max_act"].numpy()),
            "mean_act": pa.array(sc["mean_act"].numpy()),
        }
        cols.update(self._hist(f0, f1, sc["max_act"]))
        lg = self.logits
        for side, (ids_i, vals_i) in (("pos", (0, 1)), ("neg", (2, 3))):
            ids = lg[ids_i][f0:f1] if lg else None
            cols[f"{side}_tokens"] = _fixed(ids.int() if lg else None, F, pa.int32())
            cols[f"{side}_strs"] = _strs(self.vocab, ids, F) if lg else _fixed(None, F, pa.string())
            cols[f"{side}_logits"] = _fixed(lg[vals_i][f0:f1].float() if lg else None, F, pa.float32())
        nb = self.neighbours
        cols["neighbours"] = _fixed(nb[0][f0:f1].int() if nb else None, F, pa.int32())
        cols["neighbour_cos"] = _fixed(nb[1][f0:f1].float() if nb else None, F, pa.float32())
        dn = self.decoder_norms
        cols["decoder_norms"] = _fixed(dn[f0:f1].float() if dn is not None else None, F, pa.float32())
        cols["samples"] = self._samples(f0, f1)
        return pa.RecordBatch.from_arrays([cols[f.name] for f in SCHEMA], schema=SCHEMA)

    def _hist(self, f0: int, f1: int, max_act: torch.Tensor) -> dict[str, pa.Array]:
        from .stats import HIST_BINS

        h = self.stats.hist.view(-1, HIST_BINS)[f0:f1]
        nz = h > 0
        any_ = nz.any(1)
        b = torch.arange(HIST_BINS)
        lo = torch.where(nz, b, HIST_BINS).amin(1)
        hi = torch.where(nz, b, -1).amax(1)
        mask = (b >= lo[:, None]) & (b <= hi[:, None])
        edges = self.edges.expand(len(h), -1).clone()
        edges[:, -1] = max_act  # the overflow bin ends at the feature's max
        emask = (torch.arange(HIST_BINS + 1) >= lo[:, None]) & (torch.arange(HIST_BINS + 1) <= hi[:, None] + 1)
        n = torch.where(any_, hi - lo + 1, 0).numpy()
        return {
            "hist_counts": _lists(pa.array(h[mask].numpy()), n, pa.int64()),
            "hist_edges": _lists(pa.array(edges[emask].numpy()), np.where(n > 0, n + 1, 0), pa.float32()),
        }

    def _samples(self, f0: int, f1: int) -> pa.Array:
        s = self.stats.samples(f0, f1)
        fi, ci = (s["ctx"] >= 0).nonzero(as_tuple=True)  # feature-major, in sample order
        per_feature = np.bincount(fi.numpy(), minlength=f1 - f0)
        ctx = s["ctx"][fi, ci]
        row = torch.searchsorted(self.ctx_ids, ctx)
        tokens = self.ctx_tokens[row]  # [m, T]
        acts = s["acts"][fi, ci]  # [m, T]
        m, T = tokens.shape
        si, pos = (acts > 0).nonzero(as_tuple=True)
        n_act = np.bincount(si.numpy(), minlength=m)
        kinds = pa.array(np.array(KINDS, dtype=object)[s["kind"][fi, ci].numpy()], pa.string())
        struct = pa.StructArray.from_arrays(
            [
                kinds,
                pa.array(s["interval"][fi, ci].numpy().astype(np.int32)),
                pa.array(ctx.numpy()),
                pa.array(self.ctx_docs[row].numpy()),
                pa.array(s["val"][fi, ci].numpy().astype(np.float32)),
                _fixed(tokens.int(), m, pa.int32()),
                _strs(self.vocab, tokens.numpy(), m, T),
                _lists(pa.array(pos.numpy().astype(np.int32)), n_act, pa.int32()),
                _lists(pa.array(acts[si, pos].numpy().astype(np.float32)), n_act, pa.float32()),
            ],
            fields=list(SAMPLE),
        )
        return _lists(struct, per_feature, SAMPLE)
