"""Distributed training with 2 CPU processes (gloo) under torchrun: data-parallel replicas equal
single-process training with the global batch; sweep-parallel registers every SAE; checkpoints
and --resume work under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from saelake.lake import Lake
from saelake.train import SAEConfig, SAEStore, train
from tests.train.conftest import H1

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "--hook",
    H1,
    "--arch",
    "topk",
    "--k",
    "8",
    "--expansion",
    "4",
    "--tokens",
    "2048",
    "--batch-size",
    "256",
    "--repeat",
    "--lr",
    "0.003",
    "--checkpoint-every",
    "4",
    "--quiet",
]


def _lake(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "saelake.lake", "train", *args, "--nproc", str(nproc)]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_data_parallel_resumed_equals_single_process(lake_dir):
    """Killed at a checkpoint (--stop-after) and resumed under torchrun: the single-process weights."""
    # dead_window (default tokens / 4) is 2 steps: AuxK runs too, with its batch-wide variance all-reduced
    train(
        lake_dir,
        [SAEConfig(hooks=[H1], name="single", k=8, expansion=4, lr=3e-3)],
        run="r1",
        tokens=2048,
        batch_size=256,
        repeat=True,
        progress=False,
        checkpoint_every=4,
    )
    cut = _lake("--lake", lake_dir, "--run", "r1", *COMMON, "--name", "dp", "--parallel", "data", "--stop-after", "4")
    assert cut.returncode == 0 and "interrupted at step 4" in cut.stdout, cut.stdout + cut.stderr[-3000:]
    res = _lake("--lake", lake_dir, "--run", "r1", *COMMON, "--name", "dp", "--parallel", "data", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("sae dp:") == 1  # rank 0 reports
    store = SAEStore(lake_dir)
    cfg = store.config("dp")
    assert cfg["training"]["parallel"] == "data" and cfg["training"]["world_size"] == 2
    assert cfg["tokens_trained"] == 2048
    a, b = store.weights("single"), store.weights("dp")
    for key in a:  # same global batches and steps; only the summation order of the gradients differs
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)
    assert abs(cfg["fvu"] - store.config("single")["fvu"]) < 1e-3
    assert {r[0] for r in Lake(lake_dir).query("select name from saes")[1]} >= {"single", "dp"}


def test_data_parallel_batchtopk_selects_over_the_global_batch(lake_dir):
    """BatchTopK's k·B largest scores are taken over both ranks' rows, as one process would."""
    args = [a if a != "topk" else "batchtopk" for a in COMMON]
    train(
        lake_dir,
        [SAEConfig(hooks=[H1], name="single-b", arch="batchtopk", k=8, expansion=4, lr=3e-3)],
        run="r1",
        tokens=2048,
        batch_size=256,
        repeat=True,
        progress=False,
    )
    res = _lake("--lake", lake_dir, "--run", "r1", *args, "--name", "dp-b", "--parallel", "data")
    assert res.returncode == 0, res.stderr[-3000:]
    store = SAEStore(lake_dir)
    a, b = store.weights("single-b"), store.weights("dp-b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)
    assert abs(store.config("dp-b")["l0"] - store.config("single-b")["l0"]) < 1e-3


SWEEP = f"""
run = "r1"
hook = "{H1}"
tokens = 1024
batch_size = 256
repeat = true
lr = 0.003
expansion = 4
[[sae]]
k = 8
[[sae]]
k = 4
[[sae]]
k = 8
seed = 3
"""


def test_sweep_parallel_registers_every_sae(lake_dir, tmp_path):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    p = _lake("--lake", lake_dir, "--config", str(tmp_path / "sweep.toml"), "--name", "sp", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    names = sorted(r[0] for r in Lake(lake_dir).query("select name from saes where status = 'complete'")[1])
    assert names == ["sp-1", "sp-2", "sp-3"]
    store = SAEStore(lake_dir)
    assert store.config("sp-1")["training"]["parallel"] == "sweep"
    # rank 0 stacked SAEs 1 and 3, rank 1 trained SAE 2 alone; each read the whole stream
    assert store.config("sp-1")["training"]["stacked_with"] == ["sp-1", "sp-3"]
    assert store.config("sp-2")["training"]["stacked_with"] == ["sp-2"]
    assert all(store.config(n)["tokens_trained"] == 1024 for n in names)
