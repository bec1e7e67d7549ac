"""The training examples run tiny (tiny model, tiny sizes) and print what they made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import H1

REPO = Path(__file__).resolve().parents[2]
TINY = ["--tokens", "1024", "--batch-size", "256", "--context-size", "32", "--expansion", "2", "--hook", H1]


def _run(script, *args, cwd):
    cwd = cwd / "work"  # not next to the lake folder
    cwd.mkdir(exist_ok=True)
    p = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


@pytest.mark.parametrize("script", ["train_sae_topk.py", "train_sae_batchtopk.py", "train_sae_jumprelu.py"])
def test_live_examples(script, lake_dir, snapshot, tmp_path):
    extra = ["--k", "4"] if "jumprelu" not in script else []
    out = _run(
        script,
        "--lake",
        lake_dir,
        "--model",
        snapshot["model"],
        "--dataset",
        snapshot["corpus"],
        *TINY,
        *extra,
        "--name",
        "ex",
        cwd=tmp_path,
    )
    assert "sae ex:" in out and "live tokens, FVU" in out


def test_cached_and_sweep_examples(lake_dir, snapshot, tmp_path):
    common = ["--lake", lake_dir, "--model", snapshot["model"], "--dataset", snapshot["corpus"], "--run", "r1", *TINY]
    out = _run("train_sae_cached.py", *common, "--k", "4", "--name", "cached", cwd=tmp_path)
    assert "sae cached: topk k 4" in out and "trained on snapshot r1 v1" in out
    out = _run("sweep.py", *common, "--ks", "2,4", "--out", str(tmp_path / "p.png"), cwd=tmp_path)
    assert "4 SAEs from one pass" in out and (tmp_path / "p.png").exists()
