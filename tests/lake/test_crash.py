"""Crash safety: SIGKILL or Ctrl-C mid-ingest, then --resume, equals an uninterrupted run."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pytest

from saelake.lake import Lake
from tests.conftest import HOOKS, REPO, cli


def _ingest_args(lake, model, corpus, *extra):
    return [
        sys.executable,
        "-m",
        "saelake.lake",
        "ingest",
        "--lake",
        lake,
        "--model",
        model,
        "--dataset",
        corpus,
        "--hooks",
        ",".join(HOOKS),
        "--tokens",
        "12000",
        "--context-size",
        "32",
        "--run",
        "r1",
        "--shuffle-buffer",
        "256",
        "--quiet",
        *extra,
    ]


def _rows(lake):
    """Every row of both tables keyed by (context_id, position), values included."""
    t = lance.dataset(f"{lake}/runs/r1/tokens.lance").to_table()
    order = np.lexsort((t.column("position").to_numpy(), t.column("context_id").to_numpy()))
    t = t.take(order)
    c = lance.dataset(f"{lake}/runs/r1/contexts.lance").to_table()
    c = c.take(np.argsort(c.column("context_id").to_numpy()))
    return t, c


def _interrupt(lake, model, corpus, sig, min_commits: int):
    """Start a real ingest, wait for some commits, then deliver `sig`."""
    proc = subprocess.Popen(
        _ingest_args(lake, model, corpus), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    versions = Path(lake) / "runs" / "r1" / "tokens.lance" / "_versions"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if versions.exists() and len(list(versions.glob("*.manifest"))) >= min_commits:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "ingest finished before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, tiny_corpus):
    lake = str(tmp_path_factory.mktemp("ref") / "lake")
    subprocess.run(_ingest_args(lake, tiny_model, tiny_corpus), cwd=REPO, check=True, capture_output=True)
    return _rows(lake)


@pytest.mark.parametrize("sig,commits", [(signal.SIGKILL, 2), (signal.SIGINT, 4)])
def test_interrupted_ingest_resumes_to_the_same_rows(tmp_path, tiny_model, tiny_corpus, reference, sig, commits):
    lake = str(tmp_path / "lake")
    code, err = _interrupt(lake, tiny_model, tiny_corpus, sig, commits)
    m = Lake(lake).manifest("r1")
    assert m.status != "complete"
    if sig == signal.SIGINT:
        assert code == 130 and m.status == "failed" and "resum" in err
    else:
        assert code == -signal.SIGKILL
    p = subprocess.run(
        _ingest_args(lake, tiny_model, tiny_corpus, "--resume"), cwd=REPO, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert Lake(lake).manifest("r1").status == "complete"
    (t, c), (rt, rc) = _rows(lake), reference
    assert t.num_rows == rt.num_rows and c.num_rows == rc.num_rows
    assert t.equals(rt) and c.equals(rc)  # same (context_id, position) rows, same values
    assert cli("verify", "--lake", lake)[0] == 0  # every committed data file has its checksum, and it holds


def test_failed_resume_settings_are_refused(tmp_path, tiny_model, tiny_corpus):
    lake = str(tmp_path / "lake")
    _interrupt(lake, tiny_model, tiny_corpus, signal.SIGKILL, 1)
    before = sorted(p.name for p in Path(lake).rglob("*"))
    # a second ingest without --resume is refused, and changes nothing
    p = subprocess.run(_ingest_args(lake, tiny_model, tiny_corpus), cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and "--resume" in p.stderr
    args = _ingest_args(lake, tiny_model, tiny_corpus, "--resume")
    args[args.index("--context-size") + 1] = "16"
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and "context_size=32" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in Path(lake).rglob("*")) == before


def test_five_kills_in_a_row(tmp_path, tiny_model, tiny_corpus, reference):
    """SIGKILL at 5 random points, resuming in between: the final run equals an uninterrupted one."""
    import random

    lake = str(tmp_path / "lake")
    rng = random.Random(1234)
    versions = Path(lake) / "runs" / "r1" / "tokens.lance" / "_versions"
    for i in range(5):
        extra = ["--resume"] if i else []
        proc = subprocess.Popen(
            _ingest_args(lake, tiny_model, tiny_corpus, *extra),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen = len(list(versions.glob("*.manifest"))) if versions.exists() else 0
        want = seen + rng.randint(1, 3)  # a random number of further commits, then a random extra delay
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if versions.exists() and len(list(versions.glob("*.manifest"))) >= want:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))
        proc.kill()
        proc.communicate(timeout=60)
        assert Lake(lake).manifest("r1").status != "complete", "finished before the kill: shrink the delay"
    p = subprocess.run(
        _ingest_args(lake, tiny_model, tiny_corpus, "--resume"), cwd=REPO, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    (t, c), (rt, rc) = _rows(lake), reference
    assert t.equals(rt) and c.equals(rc)
