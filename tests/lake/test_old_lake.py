"""A lake written by an older saelake (tests/data/old-lake, commit 0097db9) keeps opening."""

import json
import shutil
from pathlib import Path

import pytest

from saelake.lake import SnapshotSource
from tests.conftest import cli

OLD_LAKE = Path(__file__).resolve().parents[1] / "data" / "old-lake"
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def old_lake(tmp_path) -> str:
    root = tmp_path / "old-lake"
    shutil.copytree(OLD_LAKE, root)
    return str(root)


def test_snapshots_of_an_old_run_read(old_lake):
    first, second = SnapshotSource(old_lake, "r1", 1), SnapshotSource(old_lake, "r1")
    assert (first.n_tokens, second.n_tokens, second.version) == (30, 60, 2)
    rows = sum(len(b) for b in second.token_batches(16))
    contexts = [c for b in first.context_batches(4) for c in b.context_id.tolist()]
    batch = next(second.token_batches(8, [HOOK]))
    assert rows == 60 and contexts == [0, 1] and batch.acts[HOOK].shape == (8, 32)


def test_cli_lists_shows_and_verifies_an_old_lake(old_lake):
    code, out, err = cli("ls", "--lake", old_lake, "--json")
    listed = json.loads(out)
    assert code == 0, err
    assert [r["name"] for r in listed["runs"]] == ["r1"] and listed["runs"][0]["n_versions"] == 2
    assert [s["name"] for s in listed["saes"]] == ["s1"] and [a["name"] for a in listed["analyses"]] == ["s1"]
    code, out, err = cli("show", "--lake", old_lake, "r1")
    assert code == 0 and "version 2: 64 tokens" in out, out + err
    code, out, err = cli("verify", "--lake", old_lake)  # legacy: nothing to compare contents with, not damage
    assert code == 0 and "0 problem(s)" in out and "note: run r1: no checksums recorded" in out, out + err
    assert "note: analysis s1: no checksums recorded" in out


def test_sae_and_analysis_of_an_old_lake_load(old_lake):
    from saelake.analyze.stores import EmbeddedStore
    from saelake.lake import Lake
    from saelake.train.store import SAEStore

    sae, cfg = SAEStore(old_lake).load("s1")
    assert (cfg["arch"], cfg["run"], sae.d_sae) == ("topk", "r1", 16)
    store = EmbeddedStore(Lake(old_lake))
    rec = store.record("s1")
    assert (rec.sae, rec.run, rec.n_features) == ("s1", "r1", 16)
    assert [s["feature"] for s in store.scalars("s1")] == list(range(16))
    assert store.feature("s1", 3)["feature"] == 3
    code, out, err = cli("feature", "--lake", old_lake, "s1", "3")
    assert code == 0 and "feature 3" in out.lower(), out + err
