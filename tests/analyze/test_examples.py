"""The analysis examples run end to end at tiny sizes on the tiny model (live; cached into MongoDB)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, env: dict | None = None) -> str:
    p = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def tiny(tiny_model, tiny_corpus):
    return [
        "--model",
        tiny_model,
        "--dataset",
        tiny_corpus,
        "--hook",
        "blocks.0.hook_resid_post",
        "--context-size",
        "32",
        "--train-tokens",
        "2048",
        "--train-batch-size",
        "256",
        "--expansion",
        "2",
        "--k",
        "4",
    ]


def test_analyze_live_example(tmp_path, tiny_model, tiny_corpus):
    out = _run(
        "analyze_sae.py",
        "--lake",
        str(tmp_path / "lake"),
        *tiny(tiny_model, tiny_corpus),
        "--tokens",
        "640",
        "--sae",
        "s1",
    )
    assert "trained sae s1" in out and "analysis s1-live: 64 features over" in out
    assert "top contexts" in out and "«" in out and "next: lake feature" in out


def test_analyze_cached_example_into_mongo(tmp_path, tiny_model, tiny_corpus, mongo_server):
    uri = mongo_server + "examples"
    out = _run(
        "analyze_sae_cached.py",
        "--lake",
        str(tmp_path / "lake"),
        *tiny(tiny_model, tiny_corpus),
        "--ingest-tokens",
        "1024",
        "--sae",
        "s2",
        env={"MONGO_URI": uri},
    )
    assert "trained sae s2 on snapshot cached-2d" in out
    assert f"analysis s2 -> {uri}: 64 features" in out and out.count("  feature ") == 5
    import pymongo

    db = pymongo.MongoClient(uri).get_default_database()
    assert db.features.count_documents({"sae": "s2", "analysis": "s2"}) == 64
