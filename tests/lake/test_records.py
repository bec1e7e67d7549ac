"""Typed records: malformed manifests and analysis records are one line naming the file and the key."""

import json
import shutil
from pathlib import Path

import pytest

from saelake.lake import Lake
from saelake.lake.records import AnalysisRecord, RunManifest
from tests.conftest import cli

OLD_LAKE = Path(__file__).resolve().parents[1] / "data" / "old-lake"


@pytest.fixture
def lake(tmp_path) -> Path:
    root = tmp_path / "lake"
    shutil.copytree(OLD_LAKE, root)
    return root


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda m: m["versions"][1]["rows"].update(tokens="many"),
            "key 'versions[1].rows.tokens' must be an integer, not 'many'",
        ),
        (lambda m: m.pop("hooks"), "key 'hooks' is missing"),
        (
            lambda m: m["model_info"].update(bos_token_id=[0]),
            "key 'model_info.bos_token_id' must be an integer or null",
        ),
        (lambda m: m.update(hookz=[]), "unknown key 'hookz' (not a key of RunManifest)"),
        (lambda m: m.update(schema_version=99), "schema_version 99 was written by a newer saelake"),
    ],
)
def test_a_malformed_manifest_is_one_line_naming_the_file_and_the_key(lake, change, message):
    manifest = lake / "runs" / "r1" / "manifest.json"
    _edit(manifest, change)
    code, out, err = cli("show", "--lake", str(lake), "r1")
    assert code == 2 and err.startswith(f"error: {manifest}: {message}") and len(err.splitlines()) == 1, err


def test_a_malformed_analysis_record_is_one_line_naming_the_file_and_the_key(lake):
    record = lake / "analyses" / "s1" / "analysis.json"
    _edit(record, lambda r: r.update(n_features="16"))
    code, out, err = cli("feature", "--lake", str(lake), "s1", "3")
    assert code == 2 and err.strip() == f"error: {record}: key 'n_features' must be an integer, not '16'", err


def test_old_records_read_as_version_1_and_are_rewritten_at_the_current_version(lake):
    lk = Lake(str(lake))
    m = lk.manifest("r1")
    assert (m.schema_version, m.checksums_from, m.versions[1].rows) == (1, None, {"contexts": 4, "tokens": 60})
    lk.write_manifest(m)
    written = json.loads((lake / "runs" / "r1" / "manifest.json").read_text())
    assert written["schema_version"] == RunManifest.SCHEMA_VERSION == 3 and written["checksums_from"] is None
    assert m.codecs is None and m.codec("blocks.0.hook_resid_post") == m.dtype == "float16"
    assert RunManifest.from_json(written, "here") == lk.manifest("r1") != m  # only the version differs
    rec = lk.analysis_record("s1")
    assert rec.schema_version == 1 and AnalysisRecord.from_json(rec.to_json(), "here").schema_version == 2
