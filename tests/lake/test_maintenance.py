"""lake verify and lake gc."""

import dataclasses
import json
import shutil
from pathlib import Path

import lance
import pytest

from saelake.lake import Lake, SnapshotSource, UserError, checksums
from tests.conftest import cli, ingest_tiny


@pytest.fixture
def lake(tmp_path, tiny_lake):
    root = tmp_path / "lake"
    shutil.copytree(tiny_lake, root)
    return root


def test_healthy_lake_verifies(lake):
    code, out, err = cli("verify", "--lake", str(lake))
    assert code == 0 and "0 problem(s)" in out


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_data_file_is_named_by_verify_and_readers(lake, damage):
    files = sorted((lake / "runs/r1/tokens.lance/data").glob("*.lance"))
    victim = files[0]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:  # same size, garbage in the middle (metadata at the end intact)
        mid = len(data) // 3
        victim.write_bytes(data[:mid] + bytes(4096) + data[mid + 4096 :])
    code, out, err = cli("verify", "--lake", str(lake))
    if damage == "corrupt" and code == 0:
        pytest.skip("this corruption landed in bytes Lance does not decode (page padding)")
    assert code == 1 and victim.name in out, out + err
    with pytest.raises(UserError, match=f"run 'r1' tokens.lance: cannot read .*{victim.name}"):
        for _ in SnapshotSource(str(lake), "r1").token_batches(256):
            pass


def test_verify_finds_manifest_and_catalog_drift(lake):
    m = Lake(str(lake)).manifest("r1")
    m.versions[0].rows["tokens"] += 1
    Lake(str(lake)).write_manifest(m)
    code, out, _ = cli("verify", "--lake", str(lake), "r1", "--quick")
    assert code == 1 and "manifest says" in out


def test_gc_keeps_snapshots_and_removes_the_rest(tmp_path, tiny_model, tiny_corpus):
    root = tmp_path / "lake"
    ingest_tiny(str(root), tiny_model, tiny_corpus, tokens=2000)
    ingest_tiny(str(root), tiny_model, tiny_corpus, tokens=1000, append=True)
    before = [b.context_id.tolist() for b in SnapshotSource(str(root), "r1", 1).context_batches(16)]
    n_versions = len(lance.dataset(str(root / "runs/r1/tokens.lance")).versions())
    # a chunk a crashed ingest wrote and recorded the checksum of, but never committed
    from lance.fragment import write_fragments

    t = lance.dataset(str(root / "runs/r1/tokens.lance")).to_table(limit=10)
    lk = Lake(str(root))
    orphan = [json.dumps(f.to_json()) for f in write_fragments(t, str(root / "runs/r1/tokens.lance"), schema=t.schema)]
    checksums.record_commit(
        lk.storage,
        "r1",
        "tokens",
        10**6,
        checksums.fragment_checksums(lk.storage, lk.table_uri("r1", "tokens"), orphan),
    )
    n_files = len(list((root / "runs/r1/tokens.lance/data").iterdir()))
    # a failed run that nothing pins
    (root / "runs/dead").mkdir()
    m = dataclasses.replace(Lake(str(root)).manifest("r1"), name="dead", status="failed", versions=[])
    Lake(str(root)).write_manifest(m)
    code, out, _ = cli("gc", "--lake", str(root), "--dry-run")
    assert code == 0 and "would remove run dead" in out and "1 uncommitted data files" in out
    assert (root / "runs/dead").exists()
    code, out, _ = cli("gc", "--lake", str(root))
    assert code == 0 and not (root / "runs/dead").exists()
    versions = lance.dataset(str(root / "runs/r1/tokens.lance")).versions()
    assert len(versions) == 2 < n_versions  # the two snapshots
    assert len(list((root / "runs/r1/tokens.lance/data").iterdir())) == n_files - 1
    assert [b.context_id.tolist() for b in SnapshotSource(str(root), "r1", 1).context_batches(16)] == before
    assert cli("verify", "--lake", str(root))[0] == 0
    assert Path(root / "runs/r1/manifest.json").exists()
    # the removed file's checksum went with it; the committed files keep theirs
    committed = sorted(p for p, _ in checksums.data_files(lk.dataset("r1", "tokens")))
    assert sorted(checksums.recorded(lk.storage, "r1", "tokens")) == committed
    assert sorted(p.name for p in (root / "runs/r1/checksums").iterdir()) == ["contexts.json", "tokens.json"]


def test_verify_checks_sae_weights(lake):
    from saelake.train import SAEConfig, train

    train(
        str(lake),
        [SAEConfig(hooks=["blocks.0.hook_resid_post"], arch="topk", k=4, expansion=2, name="s1")],
        progress=False,
        run="r1",
        tokens=1024,
        batch_size=256,
    )
    assert cli("verify", "--lake", str(lake), "s1")[0] == 0
    w = lake / "saes/s1/weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    code, out, _ = cli("verify", "--lake", str(lake), "s1")
    assert code == 1 and "sae s1: weights.safetensors checksum" in out
