"""Embedded (Lance) and MongoDB (real nx-27017 over TCP) stores hold the same analysis."""

from __future__ import annotations

import time
from pathlib import Path

import pymongo
import pytest

from saelake.analyze.run import AnalyzeConfig, analyze
from saelake.analyze.sql import relations
from saelake.analyze.stores import EmbeddedStore, MongoStore, redact
from saelake.lake import Lake, UserError
from tests.analyze.conftest import cli, free_port


def test_embedded_and_mongo_read_back_identical(lake_copy, mongo_server):
    kw = dict(lake=lake_copy, sae="relu", batch_size=8, top_k=4, per_interval=2, n_zero=2)
    emb = analyze(AnalyzeConfig(**kw, name="rel-emb"), progress=False)
    uri = mongo_server + "same"
    mon = analyze(AnalyzeConfig(**kw, name="rel-mongo", store=uri), progress=False)
    e, m = EmbeddedStore(Lake(lake_copy)), MongoStore(uri)
    skip = {"name", "store", "created", "seconds", "tokens_per_second", "config", "features_table", "checksums"}
    assert {k: v for k, v in e.record("rel-emb").to_json().items() if k not in skip} == {
        k: v for k, v in m.record("rel-mongo").to_json().items() if k not in skip
    }
    assert mon.store == uri and emb.store == "embedded"
    for j in range(mon.n_features):
        a, b = e.feature("rel-emb", j), m.feature("rel-mongo", j)
        assert a == b, j
    assert e.scalars("rel-emb") == m.scalars("rel-mongo")
    # one compact document per (sae, analysis, feature), unique; the SAE and the analysis documents
    db = m.db
    assert db.features.count_documents({"sae": "relu", "analysis": "rel-mongo"}) == 48
    doc = db.features.find_one({"analysis": "rel-mongo", "feature": 0})
    assert {
        "sae",
        "analysis",
        "feature",
        "count",
        "density",
        "max_act",
        "mean_act",
        "hist_edges",
        "hist_counts",
        "pos_tokens",
        "pos_strs",
        "neg_logits",
        "neighbours",
        "samples",
    } <= set(doc)
    assert {"tokens", "strs", "positions", "acts", "context_id", "kind"} <= set(doc["samples"][0])
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        db.features.insert_one({"sae": "relu", "analysis": "rel-mongo", "feature": 0})
    assert db.saes.find_one({"name": "relu"})["arch"] == "relu"
    agg = list(
        db.features.aggregate(
            [
                {"$match": {"analysis": "rel-mongo"}},
                {"$group": {"_id": "$analysis", "n": {"$sum": 1}, "tok": {"$sum": "$count"}}},
            ]
        )
    )
    assert agg[0]["n"] == 48 and agg[0]["tok"] == sum(r["count"] for r in e.scalars("rel-emb"))
    # the lake knows both analyses (catalog + analysis.json pointers), and lake feature reads either store
    names, rows = Lake(lake_copy).query("select name, store, n_features from analyses order by name")
    assert rows == [("rel-emb", "embedded", 48), ("rel-mongo", uri, 48)]
    code, out_e, err = cli("feature", "--lake", lake_copy, "relu", "5", "--analysis", "rel-emb")
    assert code == 0, err
    code, out_m, err = cli("feature", "--store", uri, "relu", "5", "--analysis", "rel-mongo")
    assert code == 0, err
    assert out_e.replace("rel-emb", "X") == out_m.replace("rel-mongo", "X")
    m.close()


def test_overwrite_replaces_atomically(lake_copy, mongo_server):
    analyze(AnalyzeConfig(lake=lake_copy, sae="topk", tokens=500), progress=False)
    lake = Lake(lake_copy)
    old = EmbeddedStore(lake).record("topk").features_table
    with pytest.raises(UserError, match="already exists.*--name.*--overwrite"):
        analyze(AnalyzeConfig(lake=lake_copy, sae="topk"), progress=False)
    analyze(AnalyzeConfig(lake=lake_copy, sae="topk", tokens=1000, overwrite=True), progress=False)
    rec = EmbeddedStore(lake).record("topk")
    assert rec.contexts == 32 and rec.features_table != old
    left = set(lake.storage.listdir("analyses", "topk")) - {"claim.json"}  # the name's claim stays
    assert left == {"analysis.json", rec.features_table}  # the old table is gone
    uri = mongo_server + "ow"
    analyze(AnalyzeConfig(lake=lake_copy, sae="topk", tokens=500, store=uri, name="m"), progress=False)
    analyze(AnalyzeConfig(lake=lake_copy, sae="topk", tokens=1000, store=uri, name="m", overwrite=True), progress=False)
    m = MongoStore(uri)
    assert m.record("m").contexts == 32 and m.db.features.count_documents({"analysis": "m"}) == 64


def test_flipped_bytes_in_an_analysis_table_are_named_by_verify(lake_copy):
    analyze(AnalyzeConfig(lake=lake_copy, sae="topk", tokens=500), progress=False)
    rec = EmbeddedStore(Lake(lake_copy)).record("topk")
    (data_file,) = rec.checksums  # one data file, its sha256 recorded with the analysis
    assert data_file.startswith(f"{rec.features_table}/data/")
    assert cli("verify", "--lake", lake_copy, "topk")[0] == 0  # the SAE topk and its analysis
    victim = Path(lake_copy) / "analyses" / "topk" / data_file
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    code, out, _ = cli("verify", "--lake", lake_copy)
    assert code == 1 and f"analysis topk: data file {victim} is damaged" in out, out


def test_failed_analysis_leaves_nothing(lake_copy, monkeypatch):
    import saelake.analyze.table as table

    def boom(self, f0, f1):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(table.FeatureTable, "_samples", boom)
    with pytest.raises((RuntimeError, OSError), match="disk on fire"):
        analyze(AnalyzeConfig(lake=lake_copy, sae="topk", tokens=300), progress=False)
    assert Lake(lake_copy).storage.listdir("analyses") == []


def test_mongo_unreachable_fails_fast_without_password(lake_copy):
    uri = f"mongodb://alice:s3cret@127.0.0.1:{free_port()}/x"
    t = time.time()
    code, out, err = cli("analyze", "--lake", lake_copy, "topk", "--store", uri, "--quiet")
    assert code == 2 and time.time() - t < 5
    assert err.count("\n") == 1 and "127.0.0.1" in err and "s3cret" not in err and "alice:***@" in err
    assert Lake(lake_copy).storage.listdir("analyses") == []
    assert redact("mongodb://h:1/db") == "mongodb://h:1/db"


def test_query_features_relation(lake_copy):
    analyze(AnalyzeConfig(lake=lake_copy, sae="topk", name="a-1", top_k=3), progress=False)
    lake = Lake(lake_copy)
    sql = "select feature, density, count from features__a_1 order by density desc, feature limit 5"
    names, rows = lake.catalog.query(sql, relations(lake, sql))
    scal = sorted(EmbeddedStore(lake).scalars("a-1"), key=lambda r: (-r["density"], r["feature"]))[:5]
    assert names == ["feature", "density", "count"] and rows == [(r["feature"], r["density"], r["count"]) for r in scal]
    sql = "select feature, len(samples) as n, samples[1].max_act as top from features__a_1 where count > 0 limit 3"
    _, rows = lake.catalog.query(sql, relations(lake, sql))
    assert rows and all(n >= 1 and top > 0 for _, n, top in rows)
    with pytest.raises(UserError, match="no analysis"):
        relations(lake, "select * from features__nope")
