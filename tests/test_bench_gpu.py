"""bench/gpu.sh's CPU dry run: the one-shot GPU readiness script works end to end (ingest, reader,
fp32 and bf16-autocast training, the matmul bound) before anyone spends GPU time on it."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_bench_dry_run_on_cpu():
    p = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--device", "cpu", "--tiny", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "PY": sys.executable},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["device"] == "cpu" and out["d_sae"] == 8 * out["d_in"]
    for key in ("ingest_tok_s", "matmul_flop_s", "bound_tok_s", "reader_tok_s", "train_fp32_tok_s", "train_bf16_tok_s"):
        assert out[key] > 0, key
    # a step does more than its encoder GEMM: no run can beat the bound it is measured against
    assert 0 < out["train_fp32_fraction"] < 1
