"""Content checksums: every committed data file has one, recorded in the lake; `lake verify` recomputes them."""

import json
import shutil
from pathlib import Path

import pytest

from saelake.lake import Lake
from saelake.lake.checksums import data_files, file_checksum, recorded
from tests.conftest import cli, ingest_tiny


@pytest.fixture
def lake(tmp_path, tiny_lake) -> Path:
    root = tmp_path / "lake"
    shutil.copytree(tiny_lake, root, ignore=shutil.ignore_patterns("catalog.duckdb*"))
    return root


def flip(path: Path, at: float = 0.5) -> None:
    """Invert 8 bytes in the middle of a file: same size, same footer, different content."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + 8] = bytes(b ^ 0xFF for b in data[i : i + 8])
    path.write_bytes(bytes(data))


def test_every_committed_data_file_has_its_checksum_recorded(lake):
    lk = Lake(str(lake))
    assert lk.manifest("r1").checksums_from == 0
    assert sorted(p.name for p in (lake / "runs/r1/checksums").iterdir()) == ["contexts.json", "tokens.json"]
    for table in ("tokens", "contexts"):
        sums = recorded(lk.storage, "r1", table)
        files = [p for p, _ in data_files(lk.dataset("r1", table))]
        assert len(files) > 1 and sorted(sums) == sorted(files)  # one per chunk commit, nothing else
        for name in files:
            assert sums[name] == file_checksum(lk.storage, str(lake / f"runs/r1/{table}.lance/data/{name}"))


@pytest.mark.parametrize("table", ["tokens", "contexts"])
def test_flipped_bytes_in_a_data_file_are_named_by_verify(lake, table):
    files = sorted((lake / f"runs/r1/{table}.lance/data").iterdir())
    victim = files[len(files) // 2]
    flip(victim)
    code, out, err = cli("verify", "--lake", str(lake))
    assert code == 1, out + err
    damaged = [line for line in out.splitlines() if "damaged" in line]
    assert len(damaged) == 1 and damaged[0].startswith(f"run r1 {table}:") and victim.name in damaged[0], out
    assert cli("verify", "--lake", str(lake), "r1", "--quick")[0] == 0  # sizes only: same size, not seen


def test_a_missing_checksum_in_a_checksummed_run_is_a_problem(lake):
    sums = lake / "runs/r1/checksums/tokens.json"
    rec = json.loads(sums.read_text())
    dropped = sorted(rec["files"])[0]
    del rec["files"][dropped]
    sums.write_text(json.dumps(rec))
    code, out, _ = cli("verify", "--lake", str(lake), "r1")
    assert code == 1 and "no checksum recorded for data file" in out and dropped in out


def test_a_run_begun_before_checksums_is_checked_from_its_next_commits(tmp_path, tiny_model, tiny_corpus):
    """As an old lake looks (no checksums, checksums_from absent), then extended by today's ingest."""
    root = tmp_path / "lake"
    ingest_tiny(str(root), tiny_model, tiny_corpus, tokens=1500)
    shutil.rmtree(root / "runs/r1/checksums")
    m = json.loads((root / "runs/r1/manifest.json").read_text())
    del m["checksums_from"], m["schema_version"]
    (root / "runs/r1/manifest.json").write_text(json.dumps(m))
    old_files = {p.name for p in (root / "runs/r1/tokens.lance/data").iterdir()}
    code, out, _ = cli("verify", "--lake", str(root))
    assert code == 0 and "note: run r1: no checksums recorded" in out, out
    ingest_tiny(str(root), tiny_model, tiny_corpus, tokens=1500, append=True)
    code, out, _ = cli("verify", "--lake", str(root))
    assert code == 0 and "data file(s) predate checksums" in out, out
    new = sorted(p for p in (root / "runs/r1/tokens.lance/data").iterdir() if p.name not in old_files)
    assert sorted(recorded(Lake(str(root)).storage, "r1", "tokens")) == [p.name for p in new]
    flip(new[0])
    code, out, _ = cli("verify", "--lake", str(root))
    assert code == 1 and new[0].name in out and "damaged" in out


def test_checksums_on_s3_are_read_back_through_the_store(s3_env, tiny_model, tiny_corpus):
    uri = f"s3://{s3_env['bucket']}/lakes/sums"
    ingest_tiny(uri, tiny_model, tiny_corpus, tokens=600, hooks=["blocks.0.hook_resid_post"])
    lk = Lake(uri)
    assert sorted(lk.storage.listdir("runs", "r1", "checksums")) == ["contexts.json", "tokens.json"]
    assert cli("verify", "--lake", uri)[0] == 0
    name = sorted(recorded(lk.storage, "r1", "contexts"))[0]
    key = lk.storage.uri("runs", "r1", "contexts.lance", "data", name)
    data = bytearray(lk.storage.fs.cat(key))
    data[len(data) // 2] ^= 0xFF
    lk.storage.fs.pipe(key, bytes(data))
    code, out, _ = cli("verify", "--lake", uri)
    assert code == 1 and f"run r1 contexts: data file {key} is damaged" in out, out
