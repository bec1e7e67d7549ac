"""Analysis correctness against brute force over the same tokens (real snapshot, real SAEs)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from saelake.analyze.run import AnalyzeConfig, analyze, latents
from saelake.analyze.stats import HIST_BINS, hist_bin, priority
from saelake.analyze.stores import EmbeddedStore
from saelake.lake import Lake, SnapshotSource, load_model

BATCH, TOP_K, INTERVALS, PER, ZERO = 8, 5, (0.8, 0.6, 0.4), 3, 4


@pytest.fixture(scope="module")
def analysed(alake, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("stats") / "lake")
    shutil.copytree(alake, root)
    for sae in ("topk", "relu"):
        analyze(
            AnalyzeConfig(
                lake=root, sae=sae, batch_size=BATCH, top_k=TOP_K, intervals=INTERVALS, per_interval=PER, n_zero=ZERO
            ),
            progress=False,
        )
    return root


def brute(root: str, name: str):
    """Dense latents of every context of the snapshot: f [contexts, T, S] (invalid tokens zeroed)."""
    from saelake.train.store import SAEStore

    sae, cfg = SAEStore(root).load(name)
    src = SnapshotSource(root, "r1")
    model = load_model(src.manifest.model)
    skip = torch.tensor(
        [model.bos_token_id] + ([model.tokenizer.pad_token_id] if model.tokenizer.pad_token_id is not None else [])
    )
    fs, toks, ids, batches = [], [], [], []
    with torch.no_grad():
        for b in src.context_batches(BATCH, [cfg["hook"]]):
            n, T, d = b.acts[cfg["hook"]].shape
            valid = ~torch.isin(b.tokens, skip)
            codes = sae.encode(b.acts[cfg["hook"]].reshape(n * T, d).float())
            f = codes.dense()[0].reshape(n, T, -1) * valid[:, :, None]
            fs.append(f), toks.append(b.tokens), ids.append(b.context_id), batches.append(len(b))
    return torch.cat(fs), torch.cat(toks), torch.cat(ids), batches, model


@pytest.mark.parametrize("name", ["topk", "relu"])
def test_scalars_histogram_topk_match_brute_force(analysed, name):
    f, tokens, ids, _, model = brute(analysed, name)
    C, T, S = f.shape
    store = EmbeddedStore(Lake(analysed))
    rec = store.record(name)
    valid = ~torch.isin(tokens, torch.tensor(rec.excluded_token_ids))
    assert rec.tokens == int(valid.sum()) and rec.contexts == C and rec.n_features == S
    flat = f.reshape(-1, S)
    count = (flat > 0).sum(0)
    cmax = f.amax(1)  # [C, S]
    rows = store.scalars(name)
    assert [r["feature"] for r in rows] == list(range(S))
    assert (count > 0).sum() >= 10  # the SAEs really fire
    for r in rows:
        j = r["feature"]
        col = flat[:, j]
        nz = col[col > 0]
        assert r["count"] == int(count[j])
        assert r["density"] == pytest.approx(int(count[j]) / int(valid.sum()), rel=1e-12)
        assert r["max_act"] == pytest.approx(float(col.max()), rel=1e-5, abs=1e-7)
        assert r["mean_act"] == pytest.approx(float(nz.double().mean()) if len(nz) else 0.0, rel=1e-4, abs=1e-7)
    vocab = model.tokenizer.batch_decode([[i] for i in range(len(model.tokenizer))])
    for j in range(0, S, 7):
        feat = store.feature(name, j)
        col = flat[:, j]
        nz = col[col > 0]
        hist = torch.bincount(hist_bin(nz), minlength=HIST_BINS)
        assert sum(feat["hist_counts"]) == len(nz)
        if len(nz):
            lo = int(hist.nonzero().min())
            assert feat["hist_counts"] == hist[lo : lo + len(feat["hist_counts"])].tolist()
            assert len(feat["hist_edges"]) == len(feat["hist_counts"]) + 1
            assert feat["hist_edges"][0] <= float(nz.min()) and float(nz.max()) <= feat["hist_edges"][-1] * (1 + 1e-6)
        # top contexts: the true top-k by context max, with exact per-token activations
        top = [s for s in feat["samples"] if s["kind"] == "top"]
        want = cmax[:, j][cmax[:, j] > 0].sort(descending=True).values[:TOP_K]
        assert [s["max_act"] for s in top] == pytest.approx(want.tolist(), rel=1e-5)
        for s in feat["samples"]:
            c = int((ids == s["context_id"]).nonzero())
            assert s["tokens"] == tokens[c].tolist()
            # decoded text, except parts of a UTF-8 character: their bytes spelled <0xNN> (directions.token_strings)
            assert all(
                st == vocab[t] if "\ufffd" not in vocab[t] else "<0x" in st for st, t in zip(s["strs"], s["tokens"])
            )
            assert s["max_act"] == pytest.approx(float(cmax[c, j]), rel=1e-5, abs=1e-7)
            pos = (f[c, :, j] > 0).nonzero().squeeze(1)
            assert s["positions"] == pos.tolist()
            assert s["acts"] == pytest.approx(f[c, pos, j].tolist(), rel=1e-5)


def reference_intervals(cmax: torch.Tensor, ids: torch.Tensor, batches: list[int], j: int, seed: int = 0):
    """The documented interval rule, one feature, plain Python."""
    held: list[tuple[float, int, float]] = []  # (context max, context id, priority)
    M, i = 0.0, 0
    u = priority(ids, torch.tensor([j]), seed)[0]
    bounds = lambda v: next((k for k, p in enumerate(INTERVALS) if v > 0 and v >= p * M), -1)  # noqa: E731
    for n in batches:
        vals = cmax[i : i + n, j]
        M = max(M, float(vals.max()))
        cands = held + [(float(vals[c]), int(ids[i + c]), float(u[i + c])) for c in range(n)]
        held = []
        for k in range(len(INTERVALS)):
            mine = sorted(
                (x for x in cands if bounds(torch.tensor(x[0], dtype=torch.float32)) == k), key=lambda x: x[2]
            )
            held += mine[:PER]
        i += n
    return {(bounds(torch.tensor(v)), c) for v, c, _ in held}, M


@pytest.mark.parametrize("name", ["topk", "relu"])
def test_interval_and_non_activating_samples_obey_the_rule(analysed, name):
    f, tokens, ids, batches, _ = brute(analysed, name)
    cmax = f.amax(1)
    store = EmbeddedStore(Lake(analysed))
    n_interval = 0
    for j in range(f.shape[2]):
        feat = store.feature(name, j)
        M = feat["max_act"]
        got = {(s["interval"], s["context_id"]) for s in feat["samples"] if s["kind"] == "interval"}
        for k, c in got:  # membership, with the final max
            hi = 1.0 if k == 0 else INTERVALS[k - 1]
            v = float(cmax[int((ids == c).nonzero()), j])
            assert INTERVALS[k] * M * (1 - 1e-6) <= v and (v < hi * M or k == 0)
        want, _ = reference_intervals(cmax, ids, batches, j)
        assert got == want
        n_interval += len(got)
        zero = [s["context_id"] for s in feat["samples"] if s["kind"] == "zero"]
        pool = ids[cmax[:, j] == 0]
        u = priority(pool, torch.tensor([j]))[0]
        assert zero == pool[u.argsort()][:ZERO].tolist()
    assert n_interval > f.shape[2]  # intervals are really populated


def test_streaming_state_is_bounded():
    """Held samples and context tokens stay bounded however many batches stream by."""
    from saelake.analyze.stats import FeatureStats

    S, T, n = 16, 8, 4
    st = FeatureStats(S, T, top_k=3, per_interval=2, n_zero=2)
    g = torch.Generator().manual_seed(0)
    for b in range(200):
        f = torch.relu(torch.randn(n * T, S, generator=g) - 1.0)
        rows, lat = f.nonzero(as_tuple=True)
        ids = torch.arange(b * n, (b + 1) * n)
        st.update(
            rows, lat, f[rows, lat], torch.zeros(n, T, dtype=torch.int32), torch.ones(n, T, dtype=torch.bool), ids, ids
        )
        assert len(st.contexts) <= S * (3 + 3 * 2 + 2) + 16 * n
    st.finish()
    held = torch.cat([s.ctx[s.used] for s in (st.top, st.inter, st.zero)]).unique()
    assert set(st.contexts) == set(held.tolist())
    assert st.n_tokens == 200 * n * T and math.isclose(
        float(st.scalars()["density"].sum()), float(st.count.sum()) / (200 * n * T)
    )


def test_latents_match_dense_encode(alake):
    """The sparse path (TopK codes) and the dense path give the same non-zero latents."""
    from saelake.train.store import SAEStore

    sae, _ = SAEStore(alake).load("topk")
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(40, dtype=torch.bool)
    valid[::5] = False
    rows, lat, vals = latents(sae, x, valid)
    dense = sae.encode(x).dense()[0] * valid[:, None]
    r2, l2 = (dense > 0).nonzero(as_tuple=True)
    assert sorted(zip(rows.tolist(), lat.tolist())) == sorted(zip(r2.tolist(), l2.tolist()))
