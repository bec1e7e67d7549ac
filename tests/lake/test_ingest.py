import json
import re

import lance
import numpy as np
import pytest
import torch

from saelake.lake import Lake, SnapshotSource, load_model
from tests.conftest import HOOKS, cli, ingest_tiny, run_cli


def _tables(lake: str, run: str = "r1"):
    tokens = lance.dataset(f"{lake}/runs/{run}/tokens.lance").to_table()
    contexts = lance.dataset(f"{lake}/runs/{run}/contexts.lance").to_table()
    return tokens, contexts


def test_ingest_writes_one_row_per_token_with_every_hook(tiny_lake):
    tokens, contexts = _tables(tiny_lake)
    m = Lake(tiny_lake).manifest("r1")
    assert m.status == "complete" and m.tokens >= 4000
    assert set(tokens.column_names) >= {
        "token_id",
        "context_id",
        "position",
        "blocks_0_hook_resid_post",
        "blocks_1_hook_mlp_out",
        "blocks_0_hook_resid_post_norm",
    }
    T = m.context_size
    assert contexts.num_rows == m.contexts and m.contexts * T == m.tokens
    ctx_tokens = np.stack(contexts.column("tokens").to_numpy(zero_copy_only=False))
    bos = m.model_info.bos_token_id
    assert tokens.num_rows == int((ctx_tokens != bos).sum()) == m.rows_1d  # BOS positions excluded
    # the 1d and 2d tables hold the same tokens
    key1 = np.sort(tokens.column("context_id").to_numpy() * T + tokens.column("position").to_numpy())
    cid, pos = np.nonzero(ctx_tokens != bos)
    key2 = np.sort(contexts.column("context_id").to_numpy()[cid] * T + pos)
    assert (key1 == key2).all()
    tid = ctx_tokens[tokens.column("context_id").to_numpy(), tokens.column("position").to_numpy()]
    assert (tid == tokens.column("token_id").to_numpy()).all()
    # shuffled at write time, not in (context, position) order
    assert not (np.diff(tokens.column("context_id").to_numpy()) >= 0).all()


def test_activations_equal_a_direct_transformerlens_run(tiny_lake, tiny_model):
    m = Lake(tiny_lake).manifest("r1")
    tokens, contexts = _tables(tiny_lake)
    model = load_model(tiny_model)
    ctx = contexts.slice(0, 8)
    toks = torch.tensor(np.stack(ctx.column("tokens").to_numpy(zero_copy_only=False)))
    _, cache = model.bridge.run_with_cache(toks, names_filter=HOOKS)
    d = model.d_model
    for h in HOOKS:
        col = m.columns[h]
        stored2d = np.stack([np.stack(x) for x in ctx.column(col).to_pylist()]).astype(np.float32)
        ref = cache[h].numpy()
        np.testing.assert_allclose(stored2d, ref, rtol=2e-3, atol=1e-3)
        # and the 1d rows of those contexts hold the same numbers
        t1 = tokens.filter(tokens.column("context_id").to_numpy() < 8)
        vals = np.stack(t1.column(col).to_numpy(zero_copy_only=False)).astype(np.float32).reshape(-1, d)
        np.testing.assert_allclose(
            vals, ref[t1.column("context_id").to_numpy(), t1.column("position").to_numpy()], rtol=2e-3, atol=1e-3
        )
        norms = t1.column(col + "_norm").to_numpy()
        np.testing.assert_allclose(norms, np.linalg.norm(vals, axis=1), rtol=3e-3, atol=1e-4)
    s = m.stats[HOOKS[0]]
    all_norms = tokens.column(m.columns[HOOKS[0]] + "_norm").to_numpy()
    assert s.n == len(all_norms) and s.mean_norm == pytest.approx(all_norms.mean(), rel=1e-5)
    assert s.median_norm == pytest.approx(np.median(all_norms), rel=1e-5)


def test_catalog_lists_the_run_and_reads_activation_tables(tiny_lake):
    code, out, err = cli("query", "--lake", tiny_lake, "--json", "select name, tokens, hooks from runs")
    assert code == 0, err
    rows = json.loads(out)
    assert rows[0]["name"] == "r1" and rows[0]["tokens"] >= 4000 and rows[0]["hooks"] == HOOKS
    code, out, err = cli(
        "query",
        "--lake",
        tiny_lake,
        "--json",
        "select count(*) n, avg(blocks_0_hook_resid_post_norm) m from tokens__r1",
    )
    assert code == 0, err
    m = Lake(tiny_lake).manifest("r1")
    assert json.loads(out)[0]["n"] == m.rows_1d
    assert json.loads(out)[0]["m"] == pytest.approx(m.stats[HOOKS[0]].mean_norm, rel=1e-4)
    # activation columns are served as float32 lists
    code, out, err = cli(
        "query",
        "--lake",
        tiny_lake,
        "--json",
        "select len(blocks_1_hook_mlp_out) t, len(blocks_1_hook_mlp_out[1]) d from contexts__r1 limit 1",
    )
    assert code == 0, err
    assert json.loads(out)[0] == {"t": 32, "d": 32}
    code, out, err = cli("query", "--lake", tiny_lake, "select hook, mean_norm from hooks")
    assert code == 0 and "blocks.0.hook_resid_post" in out


def test_query_is_read_only(tiny_lake):
    for sql in (
        "delete from runs",
        "drop table runs",
        "insert into runs (name) values ('x')",
        "attach 'x.db' as x",
        "with x as (select 1) delete from runs",
    ):
        code, out, err = cli("query", "--lake", tiny_lake, sql)
        assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, (sql, err)
    assert cli("query", "--lake", tiny_lake, "select count(*) from runs")[1].strip().endswith("1")


def test_catalog_is_rebuilt_from_manifests(tmp_path, tiny_model, tiny_corpus):
    lake = str(tmp_path / "lake")
    ingest_tiny(lake, tiny_model, tiny_corpus, tokens=1000)
    (tmp_path / "lake" / "catalog.duckdb").unlink()
    code, out, _ = cli("catalog", "sync", "--lake", lake)
    assert code == 0 and "1 runs" in out
    code, out, _ = cli("ls", "--lake", lake, "--json")
    assert json.loads(out)["runs"][0]["name"] == "r1"
    code, out, _ = cli("show", "--lake", lake, "r1", "--json")
    assert json.loads(out)["hooks"] == HOOKS


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_other_dtypes_round_trip(tmp_path, tiny_model, tiny_corpus, dtype):
    lake = str(tmp_path / "lake")
    ingest_tiny(lake, tiny_model, tiny_corpus, tokens=600, dtype=dtype, layouts=["2d"])
    src = SnapshotSource(lake, "r1")
    batch = next(src.context_batches(4))
    assert batch.acts[HOOKS[0]].dtype == getattr(torch, dtype)
    _, cache = load_model(tiny_model).bridge.run_with_cache(batch.tokens, names_filter=HOOKS[:1])
    tol = 1e-2 if dtype == "bfloat16" else 1e-6
    torch.testing.assert_close(batch.acts[HOOKS[0]].float(), cache[HOOKS[0]], rtol=tol, atol=tol)
    code, out, err = cli(
        "query",
        "--lake",
        lake,
        "--json",
        "select list_sum(list_transform(blocks_0_hook_resid_post, lambda r: list_sum(r))) s "
        "from contexts__r1 where context_id = 0",
    )
    assert code == 0, err
    ctx0 = next(src.context_batches(1)).acts[HOOKS[0]].float().sum().item()
    assert json.loads(out)[0]["s"] == pytest.approx(ctx0, rel=1e-3, abs=1e-3)


def test_append_makes_a_new_version_and_keeps_the_old(tmp_path, tiny_model, tiny_corpus):
    lake = str(tmp_path / "lake")
    m1 = ingest_tiny(lake, tiny_model, tiny_corpus, tokens=1000)
    v1 = SnapshotSource(lake, "r1", version=1)
    before = sorted(b.context_id.tolist() for b in v1.context_batches(8))
    m2 = ingest_tiny(lake, tiny_model, tiny_corpus, tokens=1000, append=True)
    assert len(m2["versions"]) == 2 and m2["contexts"] == 2 * m1["contexts"]
    v1 = SnapshotSource(lake, "r1", version=1)
    assert sorted(b.context_id.tolist() for b in v1.context_batches(8)) == before
    assert v1.n_tokens == m1["rows_1d"]
    v2 = SnapshotSource(lake, "r1")
    ids = torch.cat([b.context_id for b in v2.context_batches(8)])
    assert ids.tolist() == list(range(m2["contexts"]))  # new contexts continue the corpus
    assert v2.n_tokens == m2["rows_1d"] > m1["rows_1d"]
    # the appended contexts are new text, not a repeat
    toks = torch.cat([b.tokens for b in v2.context_batches(64)])
    n = m1["contexts"]
    assert not torch.equal(toks[:n], toks[n : 2 * n])


def test_contexts_record_their_document_and_offset(tiny_lake, tiny_corpus, tiny_model):
    from saelake.lake import documents

    tok = load_model(tiny_model).tokenizer
    doc = tok(next(documents(tiny_corpus)), add_special_tokens=False)["input_ids"]  # one .txt = one document
    code, out, err = cli(
        "query",
        "--lake",
        tiny_lake,
        "--json",
        "select context_id, doc_id, doc_offset, tokens from contexts__r1 order by 1 limit 3",
    )
    assert code == 0, err
    for row in json.loads(out):
        assert row["doc_id"] == 0 and row["tokens"][1:] == doc[row["doc_offset"] : row["doc_offset"] + 31]


def test_hooks_of_other_widths_and_switched_hooks(tmp_path, tiny_model, tiny_corpus):
    """mlp.hook_post is d_mlp wide; hook_mlp_in only fires once switched on."""
    lake = str(tmp_path / "lake")
    hooks = ["blocks.0.mlp.hook_post", "blocks.1.hook_mlp_in"]
    m = ingest_tiny(lake, tiny_model, tiny_corpus, tokens=300, hooks=hooks)
    assert m["d_model"] == {"blocks.0.mlp.hook_post": 128, "blocks.1.hook_mlp_in": 32}
    b = next(SnapshotSource(lake, "r1").context_batches(2))
    _, cache = load_model(tiny_model).bridge.run_with_cache(b.tokens, names_filter=["blocks.0.mlp.hook_post"])
    torch.testing.assert_close(
        b.acts["blocks.0.mlp.hook_post"].float(), cache["blocks.0.mlp.hook_post"], rtol=2e-3, atol=2e-3
    )
    assert b.acts["blocks.1.hook_mlp_in"].shape == (2, 32, 32)


def test_progress_moves_per_forward_batch_not_per_commit(tmp_path, tiny_model, tiny_corpus):
    """One chunk (one commit) of 20 contexts in batches of 2: the bar moves ten times, not once at the end."""
    p = run_cli(
        "ingest",
        "--lake",
        str(tmp_path / "lake"),
        "--model",
        tiny_model,
        "--dataset",
        tiny_corpus,
        "--hooks",
        HOOKS[0],
        "--tokens",
        "640",
        "--context-size",
        "32",
        "--batch-size",
        "2",
        "--shuffle-buffer",
        "4096",
        "--run",
        "r1",
        env={"TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"},
    )  # tqdm's own settings: draw every update
    assert p.returncode == 0, p.stderr
    shown = [float(x) for x in re.findall(r"\| *([\d.]+)/640 ", p.stderr)]
    assert shown[-1] == 640 and sorted(set(shown)) == [64 * i for i in range(11)], p.stderr
