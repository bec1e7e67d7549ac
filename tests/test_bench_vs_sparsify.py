"""bench/vs_sparsify.py on the tiny model (saelake's side only: the sparsify venv is not built here):
the exported stream is the trainer's, and every variant is scored on the held-out rows."""

import json
import os
import subprocess
import sys

import numpy as np

from tests.conftest import REPO, TEXT


def test_vs_sparsify_runs_on_the_tiny_model(tmp_path, tiny_model):
    held = tmp_path / "held"
    held.mkdir()
    (held / "other.txt").write_text(" ".join(reversed(TEXT.read_text().split())))
    work = tmp_path / "work"
    cmd = [sys.executable, str(REPO / "bench" / "vs_sparsify.py"), "--lake", str(tmp_path / "lake")]
    cmd += ["--work", str(work), "--model", tiny_model, "--dataset", str(TEXT), "--heldout-dataset", str(held)]
    cmd += ["--hook", "blocks.1.hook_resid_post", "--ingest-tokens", "3000", "--heldout-tokens", "600"]
    cmd += ["--context-size", "32", "--tokens", "2048", "--batch-size", "256", "--d-sae", "64", "--k", "4"]
    cmd += ["--variants", "ours-sparsify-settings,ours-default", "--extra", "tied:init_encoder_norm=1.0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = np.load(next(work.glob("rows-*.npy")))
    order = np.load(next(work.glob("order-*.npy")))
    assert len(order) == 2048 and order.min() >= 0 and order.max() < len(rows)
    assert len(set(order[: len(rows)].tolist())) == min(len(rows), 2048)  # an epoch visits each row once
    for name in ("ours-sparsify-settings", "ours-default", "tied"):
        r = json.loads((work / "results" / f"{name}.json").read_text())
        assert 0 < r["heldout"]["under_10x_median"] < 1.5 and r["tokens_per_second"] > 0, name
    assert "ours-default" in p.stdout and "tied" in p.stdout
