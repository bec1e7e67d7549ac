"""`lake encode`: the latent index answers the README's questions exactly as a brute-force
re-encode of the snapshot does, resumes after a crash without losing or repeating a context, and
its data files are checksummed like the rest of the lake."""

import json
from collections import Counter, defaultdict
from pathlib import Path

import lance
import pytest

from saelake.analyze.latent_index import encode
from saelake.lake import Lake, SnapshotSource
from saelake.train import load_sae
from tests.analyze.conftest import H0
from tests.conftest import cli


def brute_force(lake: str, sae_name: str):
    """{(context_id, position): {feature: value}} and doc ids, by encoding every context here."""
    sae, _ = load_sae(lake, sae_name)
    src = SnapshotSource(lake, "r1")
    bos = src.manifest.model_info.bos_token_id
    out, docs = {}, {}
    for b in src.context_batches(16, [H0]):
        n, T = b.tokens.shape
        dense = sae.encode(b.acts[H0].float().reshape(n * T, -1)).dense()[0].reshape(n, T, -1)
        for i in range(n):
            docs[int(b.context_id[i])] = int(b.doc_id[i])
            for t in range(T):
                if int(b.tokens[i, t]) != bos:
                    f = dense[i, t]
                    nz = (f != 0).nonzero().squeeze(1)
                    # values as the index stores them (float16), so ties order the same way
                    out[int(b.context_id[i]), t] = {int(j): float(f[j].half()) for j in nz}
    return out, docs


def query(lake, sql):
    code, out, err = cli("query", "--lake", lake, "--json", sql)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def indexed(alake, tmp_path_factory):
    import shutil

    dst = str(tmp_path_factory.mktemp("index") / "lake")
    shutil.copytree(alake, dst)
    assert cli("catalog", "sync", "--lake", dst)[0] == 0  # the copy has no catalog yet
    code, out, err = cli("encode", "--lake", dst, "topk", "--quiet", "--commit-contexts", "40")
    assert code == 0, err
    assert "latents__topk" in out
    return dst


def test_index_rows_equal_a_brute_force_encode(indexed):
    want, docs = brute_force(indexed, "topk")
    rec = Lake(indexed).index_record("topk")
    assert rec.status == "complete" and rec.tokens == len(want) and rec.entries == sum(map(len, want.values()))
    rows = lance.dataset(f"{indexed}/indexes/topk/latents.lance").to_table().to_pylist()
    assert len(rows) == len(want)
    for r in rows:
        got = dict(zip(r["features"], r["acts"]))
        ref = want[r["context_id"], r["position"]]
        assert list(got) == sorted(ref) and r["doc_id"] == docs[r["context_id"]]
        assert all(abs(got[f] - ref[f]) <= 1e-3 * max(1.0, abs(ref[f])) for f in ref)  # stored as float16


def test_readme_queries_match_brute_force(indexed):
    want, docs = brute_force(indexed, "topk")
    counts = Counter(f for feats in want.values() for f in feats)
    F = counts.most_common(3)[-1][0]
    # 1. the top contexts of feature F
    top = query(
        indexed,
        f"""select context_id, max(a) as act from (
        select context_id, unnest(features) as f, unnest(acts) as a from latents__topk) where f = {F}
        group by context_id order by act desc, context_id limit 5""",
    )
    per_ctx = defaultdict(float)
    for (c, _), feats in want.items():
        if F in feats:
            per_ctx[c] = max(per_ctx[c], feats[F])
    ref = sorted(per_ctx.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert [r["context_id"] for r in top] == [c for c, _ in ref]
    assert all(abs(r["act"] - a) <= 1e-3 * max(1.0, a) for r, (_, a) in zip(top, ref))
    # 2. the features that co-fire most with F (same token)
    co = query(
        indexed,
        f"""select g, count(*) as n from (select unnest(features) as g, features from latents__topk
        where list_contains(features, {F})) where g != {F} group by g order by n desc, g limit 5""",
    )
    ref_co = Counter(g for feats in want.values() if F in feats for g in feats if g != F)
    assert [(r["g"], r["n"]) for r in co] == sorted(ref_co.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    # 3. the features active in one document
    doc = docs[next(iter(want))[0]]
    active = query(
        indexed,
        f"""select distinct unnest(features) as f from latents__topk where doc_id = {doc}
        order by f""",
    )
    ref_doc = sorted({f for (c, _), feats in want.items() if docs[c] == doc for f in feats})
    assert [r["f"] for r in active] == ref_doc


def test_index_is_in_the_catalog_and_verified(indexed, tmp_path):
    assert query(indexed, "select name, sae, run, status from latent_indexes") == [
        {"name": "topk", "sae": "topk", "run": "r1", "status": "complete"}
    ]
    code, out, err = cli("verify", "--lake", indexed)
    assert code == 0, out + err
    import shutil

    damaged = str(tmp_path / "lake")
    shutil.copytree(indexed, damaged)
    data = sorted((Path(damaged) / "indexes" / "topk" / "latents.lance" / "data").iterdir())[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, out, err = cli("verify", "--lake", damaged)
    assert code == 1 and "index topk" in out and data.name in out, out + err


def test_encode_resumes_after_a_crash_without_loss_or_duplicates(lake_copy, indexed, monkeypatch):
    from saelake.analyze import latent_index

    real = latent_index._commit
    calls = {"n": 0}

    def crash_after_the_lance_commit(lake, uri, rec, batches, n, seconds):
        calls["n"] += 1
        if calls["n"] == 3:  # the data is committed to Lance, index.json never hears of it
            lance.write_dataset(__import__("pyarrow").Table.from_batches(batches), uri, mode="append")
            raise KeyboardInterrupt
        return real(lake, uri, rec, batches, n, seconds)

    monkeypatch.setattr(latent_index, "_commit", crash_after_the_lance_commit)
    with pytest.raises(KeyboardInterrupt):
        encode(lake_copy, "topk", commit_contexts=40, progress=False)
    monkeypatch.setattr(latent_index, "_commit", real)
    assert Lake(lake_copy).index_record("topk").status == "running"
    code, out, err = cli("encode", "--lake", lake_copy, "topk", "--quiet")
    assert code == 2 and "--resume" in err
    rec = encode(lake_copy, "topk", commit_contexts=40, progress=False, resume=True)
    key = [("context_id", "ascending"), ("position", "ascending")]
    got = lance.dataset(f"{lake_copy}/indexes/topk/latents.lance").to_table().sort_by(key)
    ref = lance.dataset(f"{indexed}/indexes/topk/latents.lance").to_table().sort_by(key)
    assert got.equals(ref) and rec.tokens == Lake(indexed).index_record("topk").tokens


def test_bad_input_is_one_line(indexed):
    code, out, err = cli("encode", "--lake", indexed, "nope", "--quiet")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    code, out, err = cli("query", "--lake", indexed, "select * from latents__nope")
    assert code == 2 and "lake encode" in err


def test_analyze_from_the_index_equals_analyze_by_encoding(indexed, tmp_path):
    import shutil

    lake = str(tmp_path / "lake")
    shutil.copytree(indexed, lake)
    assert cli("analyze", "--lake", lake, "topk", "--name", "enc", "--quiet")[0] == 0
    code, out, err = cli("analyze", "--lake", lake, "topk", "--name", "idx", "--from-index", "topk", "--quiet")
    assert code == 0, err
    a = lance.dataset(next((Path(lake) / "analyses" / "enc").glob("features-*.lance"))).to_table().to_pylist()
    b = lance.dataset(next((Path(lake) / "analyses" / "idx").glob("features-*.lance"))).to_table().to_pylist()
    assert len(a) == len(b) == 64
    fired = 0
    for fa, fb in zip(a, b):
        assert fa["feature"] == fb["feature"] and fa["count"] == fb["count"]
        fired += fa["count"] > 0
        assert abs(fa["max_act"] - fb["max_act"]) <= 1e-3 * max(1.0, fa["max_act"])  # the index stores float16
        tops = [s for s in fa["samples"] if s["kind"] == "top"]
        if len(tops) > 1 and tops[0]["max_act"] > 1.01 * tops[1]["max_act"]:  # no float16 tie at the top
            assert tops[0]["context_id"] == [s for s in fb["samples"] if s["kind"] == "top"][0]["context_id"]
    assert fired > 10
    code, out, err = cli("analyze", "--lake", lake, "relu", "--name", "x", "--from-index", "topk", "--quiet")
    assert code == 2 and "latent index" in err
