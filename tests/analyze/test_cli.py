"""`lake analyze` / `lake feature` through the real CLI: bad input, display, live, a trained SAE."""

from __future__ import annotations

import pytest

from saelake.analyze.sql import relations
from saelake.analyze.stores import EmbeddedStore
from saelake.lake import Lake
from tests.analyze.conftest import H0, cli, make_sae


def _ingest_1d_only(lake: str, model: str, corpus: str) -> None:
    from saelake.lake import IngestConfig, ingest

    ingest(
        IngestConfig(
            lake=lake,
            model=model,
            dataset=corpus,
            hooks=[H0],
            tokens=300,
            context_size=32,
            layouts=["1d"],
            run="only1d",
            shuffle_buffer=256,
        ),
        progress=False,
    )


def test_bad_input_one_line_exit_2_nothing_written(lake_copy, tiny_model, tiny_corpus):
    make_sae(lake_copy, "narrow", d_in=16, d_sae=8)
    make_sae(lake_copy, "otherhook", hook="blocks.1.hook_resid_post", d_sae=8)
    make_sae(lake_copy, "on1d", run="only1d", version=None, d_sae=8)
    make_sae(lake_copy, "livesae", run=None, version=None, d_sae=8)
    _ingest_1d_only(lake_copy, tiny_model, tiny_corpus)
    L = ["--lake", lake_copy, "--quiet"]
    cases = [
        (["nope"], ["no SAE 'nope'"]),
        (["./no/such/dir"], ["not found"]),
        (["narrow"], ["16", "32"]),
        (["otherhook"], ["blocks.1.hook_resid_post", "not in run 'r1'"]),
        (["on1d"], ["no 2d table", "--layout 2d", "--live"]),
        (["livesae"], ["--run", "--live"]),
        (["topk", "--run", "nope"], ["no run 'nope'"]),
        (["topk", "--version", "9"], ["versions"]),
        (["topk", "--intervals", "0.4,0.8"], ["decreasing"]),
        (["topk", "--top-k", "0"], ["--top-k"]),
        (["topk", "--store", "redis://x"], ["unknown --store"]),
        (["topk", "--name", "../x"], ["invalid analysis name"]),
        (["topk", "--model", "m"], ["--live"]),
    ]
    for args, needles in cases:
        code, out, err = cli("analyze", *L, *args)
        assert code == 2, (args, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
        for n in needles:
            assert n in err, (args, err)
        assert Lake(lake_copy).storage.listdir("analyses") == [], args
    code, out, err = cli("analyze", *L, "topk", "--tokens", "300")
    assert code == 0, err
    code, _, err = cli("analyze", *L, "topk", "--tokens", "300")
    assert code == 2 and "already exists" in err and "--name" in err and "--overwrite" in err
    for args, needle in (
        (["topk", "999"], "out of range"),
        (["relu", "0"], "no analysis of SAE 'relu'"),
        (["topk", "0", "--analysis", "zzz"], "no analysis 'zzz'"),
    ):
        code, _, err = cli("feature", "--lake", lake_copy, *args)
        assert code == 2 and needle in err and err.count("\n") == 1, (args, err)


def test_feature_view_highlights_activating_tokens(lake_copy):
    code, out, err = cli("analyze", "--lake", lake_copy, "topk", "--quiet", "--top-k", "6")
    assert code == 0, err
    assert out.startswith("analysis topk: 64 features of topk over ")
    store = EmbeddedStore(Lake(lake_copy))
    j = max((r for r in store.scalars("topk") if r["density"] < 0.1), key=lambda r: r["count"])["feature"]
    code, out, err = cli("feature", "--lake", lake_copy, "topk", str(j), "--top", "3")
    assert code == 0, err
    feat = store.feature("topk", j)
    top = feat["samples"][0]
    peak = top["positions"][top["acts"].index(max(top["acts"]))]
    assert f"feature {j} of topk" in out and "density" in out and "top contexts" in out
    assert f"«{top['strs'][peak].replace(chr(10), '↵')}»" in out  # the peak token, highlighted
    assert "promotes" in out and "neighbours" in out and "non-activating" in out
    assert out.count(" ctx ") >= 3


def test_live_analysis_matches_snapshot(lake_copy, tiny_model, tiny_corpus):
    code, out, err = cli("analyze", "--lake", lake_copy, "topk", "--quiet", "--tokens", "640", "--name", "snap")
    assert code == 0, err
    code, out, err = cli(
        "analyze",
        "--lake",
        lake_copy,
        "topk",
        "--quiet",
        "--live",
        "--model",
        tiny_model,
        "--dataset",
        tiny_corpus,
        "--context-size",
        "32",
        "--tokens",
        "640",
        "--name",
        "live",
    )
    assert code == 0, err
    st = EmbeddedStore(Lake(lake_copy))
    live, snap = st.record("live"), st.record("snap")
    assert live.source == "live" and live.contexts == snap.contexts == 20 and live.tokens == snap.tokens
    a, b = st.scalars("live"), st.scalars("snap")
    # same contexts; the snapshot holds float16 activations, live float32: counts agree up to rare flips
    assert sum(abs(x["count"] - y["count"]) for x, y in zip(a, b)) <= 0.02 * sum(y["count"] for y in b) + 2
    assert [x["max_act"] for x in a] == pytest.approx([y["max_act"] for y in b], rel=0.05, abs=1e-3)


def test_trained_sae_end_to_end(lake_copy):
    code, out, err = cli(
        "train",
        "--lake",
        lake_copy,
        "--run",
        "r1",
        "--hook",
        H0,
        "--arch",
        "topk",
        "--k",
        "4",
        "--expansion",
        "2",
        "--tokens",
        "2048",
        "--batch-size",
        "256",
        "--name",
        "trained",
        "--quiet",
    )
    assert code == 0, err
    code, out, err = cli("analyze", "--lake", lake_copy, "trained", "--quiet")
    assert code == 0, err
    lake = Lake(lake_copy)
    lake.sync()  # the catalog is rebuilt from analysis.json
    _, rows = lake.query("select name, sae, run, version, store, n_features from analyses")
    assert rows == [("trained", "trained", "r1", 1, "embedded", 64)]
    sql = "select feature, density from features__trained order by density desc limit 3"
    _, rows = lake.catalog.query(sql, relations(lake, sql))
    assert len(rows) == 3 and rows[0][1] >= rows[1][1] >= rows[2][1] > 0
    code, out, err = cli("feature", "--lake", lake_copy, "trained", str(rows[0][0]))
    assert code == 0 and "top contexts" in out, err
