"""SAEs written by older code (tests/data/legacy-0097db9: configs and weights saved by commit 0097db9,
before the dictionary registry and typed records) still load, as records and as dictionaries, and
give bit-identical outputs to what that code computed (``expected.safetensors``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelake.train import SAEStore
from tests.train.conftest import lake_main

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy-0097db9"
NAMES = ["topk", "batchtopk", "relu", "jumprelu", "transcoder", "crosscoder"]


@pytest.fixture
def old_lake(tmp_path) -> str:
    shutil.copytree(LEGACY / "saes", tmp_path / "lake" / "saes")
    return str(tmp_path / "lake")


@pytest.mark.parametrize("name", NAMES)
def test_old_sae_loads_with_the_same_outputs(old_lake, name):
    store = SAEStore(old_lake)
    assert "schema_version" not in json.loads((LEGACY / "saes" / name / "config.json").read_text())
    rec = store.record(name)
    assert rec.name == name and rec.status == "complete" and rec.weights_sha256
    sae, cfg = store.load(name)
    assert type(sae).name == cfg["arch"] and sae.hooks == cfg["hooks"] and sae.out_hooks == cfg["out_hooks"]
    want = load_file(str(LEGACY / "expected.safetensors"))
    with torch.no_grad():
        codes = sae.encode(want[f"{name}.x"])
        # the same latents, values within float32 reordering (the encoder is stored latent-major now)
        assert torch.equal(codes.dense()[0] != 0, want[f"{name}.codes"] != 0)
        torch.testing.assert_close(codes.dense()[0], want[f"{name}.codes"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(codes)[0], want[f"{name}.y_hat"], rtol=1e-5, atol=1e-5)


def test_old_sae_exports_and_shows(old_lake, tmp_path):
    code, out, err = lake_main("show", "--lake", old_lake, "topk")
    assert code == 0 and "sae topk" in out, err
    code, _, err = lake_main("export", "--lake", old_lake, "batchtopk", "-o", str(tmp_path / "out"))
    assert code == 0, err
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["saelake_arch"] == "batchtopk"
