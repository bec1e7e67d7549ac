"""The shared reader interface: SnapshotSource and LiveSource."""

import subprocess
import sys

import lance
import numpy as np
import pytest
import torch

from saelake.lake import LiveSource, SnapshotSource, UserError, load_model
from tests.conftest import HOOKS


def _keys(batches):
    return torch.cat([b.context_id * 1000 + b.position for b in batches])


def test_token_batches_cover_every_row_once_per_epoch(tiny_lake):
    src = SnapshotSource(tiny_lake, "r1", block_rows=700)
    batches = list(src.token_batches(256, seed=3))
    assert all(len(b) == 256 for b in batches[:-1])
    keys = _keys(batches)
    assert len(keys) == src.n_tokens and len(set(keys.tolist())) == src.n_tokens
    assert batches[0].acts[HOOKS[0]].shape == (256, 32) and batches[0].acts[HOOKS[0]].dtype == torch.float16
    # the same seed gives the same order; another seed another order
    assert torch.equal(keys, _keys(SnapshotSource(tiny_lake, "r1", block_rows=700).token_batches(256, seed=3)))
    assert not torch.equal(keys, _keys(SnapshotSource(tiny_lake, "r1", block_rows=700).token_batches(256, seed=4)))


def test_token_batches_mix_across_ingest_chunks(tiny_lake):
    # the lake's fragments are ingest chunks of 32 contexts; a read window spans several of them
    src = SnapshotSource(tiny_lake, "r1", block_rows=4000)
    assert len(src._table("tokens").get_fragments()) >= 4
    b = next(src.token_batches(256, seed=1))
    assert len(set((b.context_id // 32).tolist())) >= 3


def test_token_batches_match_the_table(tiny_lake):
    src = SnapshotSource(tiny_lake, "r1")
    b = next(src.token_batches(64, [HOOKS[1]], seed=0))
    assert list(b.acts) == [HOOKS[1]]
    t = lance.dataset(f"{tiny_lake}/runs/r1/tokens.lance").to_table()
    key = t.column("context_id").to_numpy() * 1000 + t.column("position").to_numpy()
    idx = {k: i for i, k in enumerate(key)}
    rows = [idx[k] for k in (b.context_id * 1000 + b.position).tolist()]
    ref = np.stack(t.column("blocks_1_hook_mlp_out").to_numpy(zero_copy_only=False)[rows])
    np.testing.assert_array_equal(b.acts[HOOKS[1]].numpy(), ref)
    np.testing.assert_array_equal(b.token_id.numpy(), t.column("token_id").to_numpy()[rows])


def test_token_batches_resume_exactly_from_state(tiny_lake):
    src = SnapshotSource(tiny_lake, "r1", block_rows=500)
    it = src.token_batches(100, seed=9, repeat=True)
    first = [next(it) for _ in range(7)]
    state = src.state()
    rest = [next(it) for _ in range(60)]  # crosses an epoch boundary
    assert state["rows"] == 700
    src2 = SnapshotSource(tiny_lake, "r1", block_rows=500)
    resumed = [b for _, b in zip(range(60), src2.token_batches(100, seed=9, start=state["rows"], repeat=True))]
    assert torch.equal(_keys(rest), _keys(resumed))
    assert torch.equal(rest[-1].acts[HOOKS[0]], resumed[-1].acts[HOOKS[0]])
    assert len(first) == 7
    # a second epoch is a new permutation of the same rows
    n = src.n_tokens
    both = _keys([b for _, b in zip(range(2), SnapshotSource(tiny_lake, "r1").token_batches(n, seed=9, repeat=True))])
    assert sorted(both[:n].tolist()) == sorted(both[n:].tolist()) and not torch.equal(both[:n], both[n:])


def test_sharded_token_batches_split_the_stream_disjointly(tiny_lake):
    # data-parallel: rank r reads only its micro-batch of each global batch; interleaved, the
    # ranks' batches are the single-process stream, also when resumed mid-stream and across epochs
    B, W, steps, start = 40, 3, 20, 7 * 120
    single = _keys(
        [
            b
            for _, b in zip(
                range(steps),
                SnapshotSource(tiny_lake, "r1", block_rows=500).token_batches(B * W, seed=5, start=start, repeat=True),
            )
        ]
    )
    per_rank = []
    for r in range(W):
        src = SnapshotSource(tiny_lake, "r1", block_rows=500)
        it = src.token_batches(B, seed=5, start=start, repeat=True, shard=(r, W))
        per_rank.append([next(it) for _ in range(steps)])
        assert src.state()["rows"] == start + steps * B * W
    merged = [per_rank[r][g] for g in range(steps) for r in range(W)]
    assert all(len(b) == B for b in merged)
    assert torch.equal(_keys(merged), single)
    v = SnapshotSource(tiny_lake, "r1", block_rows=500).token_batches(B * W, seed=5, start=start)
    assert torch.equal(
        torch.cat([b.acts[HOOKS[0]] for b in per_rank[1][:2]]),
        torch.cat([b.acts[HOOKS[0]][B : 2 * B] for _, b in zip(range(2), v)]),
    )


def test_context_batches_are_in_order_and_resume(tiny_lake):
    src = SnapshotSource(tiny_lake, "r1")
    batches = list(src.context_batches(10))
    ids = torch.cat([b.context_id for b in batches])
    assert ids.tolist() == list(range(src.n_contexts))
    assert batches[0].acts[HOOKS[0]].shape == (10, 32, 32) and batches[0].tokens.shape == (10, 32)
    later = next(src.context_batches(10, start=25))
    assert later.context_id.tolist() == list(range(25, 35))
    assert torch.equal(later.acts[HOOKS[1]], torch.cat([b.acts[HOOKS[1]] for b in batches])[25:35])


def test_live_source_serves_the_same_activations(tiny_lake, tiny_model, tiny_corpus):
    model = load_model(tiny_model)
    live = LiveSource(model, tiny_corpus, HOOKS, context_size=32, dtype="float16", shuffle_buffer=1024)
    snap = SnapshotSource(tiny_lake, "r1")
    a, b = next(live.context_batches(6)), next(snap.context_batches(6))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.context_id, b.context_id)
    torch.testing.assert_close(a.acts[HOOKS[0]], b.acts[HOOKS[0]], rtol=2e-3, atol=1e-3)
    # 1d: the live stream holds the same (context, position) rows as the lake's first chunks
    live_batches = [x for _, x in zip(range(4), live.token_batches(500, seed=0))]
    assert all((x.token_id != model.bos_token_id).all() for x in live_batches)
    state = live.state()
    assert state["rows"] == 2000
    resumed = next(
        LiveSource(model, tiny_corpus, HOOKS, context_size=32, shuffle_buffer=1024, dtype="float16").token_batches(
            500, seed=0, start=1500
        )
    )
    assert torch.equal(resumed.context_id * 1000 + resumed.position, _keys(live_batches[3:4]))


def test_reader_errors(tiny_lake):
    with pytest.raises(UserError, match="no run 'nope'"):
        SnapshotSource(tiny_lake, "nope")
    with pytest.raises(UserError, match="versions 1..1, not 5"):
        SnapshotSource(tiny_lake, "r1", version=5)
    with pytest.raises(UserError, match="not in run 'r1'"):
        next(SnapshotSource(tiny_lake, "r1").token_batches(10, ["blocks.9.hook_resid_post"]))


def test_abandoned_readers_exit_cleanly(tiny_lake):
    # A script that takes one batch and exits leaves the prefetch thread mid-read; the
    # interpreter must not tear down under it (that aborted with SIGABRT, exit -6).
    script = (
        f"import lake; s = lake.SnapshotSource({tiny_lake!r}, 'r1'); "
        "t = s.token_batches(64); next(t); c = s.context_batches(2); next(c); print('ok')"
    )
    for _ in range(3):
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-1000:])
