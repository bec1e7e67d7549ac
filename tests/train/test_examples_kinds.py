"""The examples of the bigger dictionaries run tiny (tiny models, tiny sizes) and print what they made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
TINY = ["--ingest-tokens", "2000", "--batch-size", "256", "--context-size", "32"]


def _run(script, *args, cwd):
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


def test_clt_lorsa_and_crosscoder_examples(tiny_model, tiny_corpus, tmp_path):
    lake = str(tmp_path / "lake")
    common = ["--lake", lake, "--dataset", tiny_corpus, *TINY]
    out = _run(
        "train_clt.py",
        *common,
        "--model",
        tiny_model,
        "--layers",
        "0-1",
        "--tokens",
        "2048",
        "--expansion",
        "2",
        "--k",
        "4",
        "--name",
        "c",
        cwd=tmp_path,
    )
    assert "sae c: clt over 2 layers" in out and "FVU blocks.1.hook_mlp_out:" in out, out
    out = _run(
        "train_lorsa.py",
        *common,
        "--model",
        tiny_model,
        "--layer",
        "0",
        "--tokens",
        "4096",
        "--heads",
        "64",
        "--qk-heads",
        "4",
        "--k",
        "4",
        "--name",
        "l",
        cwd=tmp_path,
    )
    assert "sae l: lorsa, 64 heads over 4 QK groups" in out and "attends to positions" in out, out
    other = make_tiny_model(tmp_path / "seed1", seed=1)
    out = _run(
        "crosscoder_across_models.py",
        *common,
        "--models",
        f"a={tiny_model},b={other}",
        "--hook",
        "blocks.1.hook_resid_post",
        "--tokens",
        "4096",
        "--expansion",
        "2",
        "--k",
        "4",
        "--name",
        "x",
        cwd=tmp_path,
    )
    assert "crosscoder over a:blocks.1.hook_resid_post, b:blocks.1.hook_resid_post" in out and "a only" in out, out
