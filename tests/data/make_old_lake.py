"""Make tests/data/old-lake: a tiny lake written by an older saelake (see tests/data/README.md).

Run it with the *old* code first on the path, e.g. for commit 0097db9:

    git archive 0097db9 | tar -x -C /tmp/old/src
    mkdir -p /tmp/old/pkg/saelake
    for p in lake train analyze catalog; do ln -s /tmp/old/src/$p /tmp/old/pkg/saelake/$p; done
    PYTHONPATH=/tmp/old/pkg:. .venv/bin/python tests/data/make_old_lake.py tests/data/old-lake

One run (2 contexts of 16 tokens, one hook, 1d + 2d, then --append of 2 more: snapshot versions
1 and 2), one TopK SAE trained a few steps on it, one embedded analysis of that SAE. The
catalog is dropped (it is an index, rebuilt by `lake catalog sync`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import TEXT, make_tiny_model

HOOK = "blocks.0.hook_resid_post"


def lake(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "saelake.lake", *args], check=True)


def main(out: str) -> None:
    out_path = Path(out).resolve()
    if out_path.exists():
        sys.exit(f"{out_path} exists: remove it first")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SAELAKE_HOME"] = f"{tmp}/home"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        model = str(make_tiny_model(Path(tmp) / "tiny-gpt2"))
        root = f"{tmp}/lake"
        common = [
            "--lake",
            root,
            "--model",
            model,
            "--dataset",
            str(TEXT),
            "--hooks",
            HOOK,
            "--tokens",
            "32",
            "--context-size",
            "16",
            "--run",
            "r1",
            "--shuffle-buffer",
            "64",
            "--quiet",
        ]
        lake("ingest", *common)
        lake("ingest", *common, "--append")
        lake(
            "train",
            "--lake",
            root,
            "--run",
            "r1",
            "--hook",
            HOOK,
            "--arch",
            "topk",
            "--d-sae",
            "16",
            "--k",
            "4",
            "--tokens",
            "128",
            "--batch-size",
            "16",
            "--repeat",
            "--name",
            "s1",
            "--quiet",
        )
        lake(
            "analyze",
            "s1",
            "--lake",
            root,
            "--top-k",
            "2",
            "--per-interval",
            "1",
            "--non-activating",
            "1",
            "--logits",
            "3",
            "--neighbours",
            "2",
            "--quiet",
        )
        for p in Path(root).glob("catalog.duckdb*"):
            p.unlink()
        shutil.copytree(root, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
