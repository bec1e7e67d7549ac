"""The UI, `lake show` and `lake ls` while a real `lake train` process runs, when it stops beating
(SIGSTOP), when it beats again, and after it was killed (SIGKILL): pages answer 200, metrics that
do not exist yet show as "–", progress shows, and a training that stopped beating shows as stalled."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.web.conftest import H0
from tests.web.web_helpers import cli, get

REPO = Path(__file__).resolve().parents[2]
STALE_AFTER_S = 3  # SAELAKE_STALE_AFTER for this test (the default is derived from the heartbeat interval)


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _sae_row(html: str, name: str) -> str:
    m = re.search(rf'<tr data-sae="{name}">(.*?)</tr>', html, re.S)
    assert m, html[-2000:]
    return re.sub(r"<[^>]+>", " ", m.group(1))


@pytest.fixture
def training(tmp_path, tiny_lake):
    """A real `lake train` subprocess, slowed down (SAELAKE_TRAIN_SLOW) and beating every 0.2 s."""
    root = tmp_path / "lake"
    shutil.copytree(tiny_lake, root, ignore=shutil.ignore_patterns("catalog.duckdb*"))
    args = [
        sys.executable,
        "-m",
        "saelake.lake",
        "train",
        "--lake",
        str(root),
        "--run",
        "r1",
        "--hook",
        H0,
        "--arch",
        "topk",
        "--k",
        "4",
        "--expansion",
        "2",
        "--tokens",
        "10000000",
        "--batch-size",
        "64",
        "--repeat",
        "--name",
        "slow",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAELAKE_TRAIN_SLOW": "0.05", "SAELAKE_HEARTBEAT_S": "0.2"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield str(root), proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()


def test_pages_while_training_stopped_resumed_and_killed(training, monkeypatch):
    from saelake.analyze.web import WebApp, start_in_thread

    root, proc = training
    monkeypatch.setenv("SAELAKE_STALE_AFTER", str(STALE_AFTER_S))
    config = Path(root) / "saes" / "slow" / "config.json"
    _wait(lambda: config.exists() or proc.poll() is not None, 120, "the training's first heartbeat")
    assert proc.poll() is None, proc.stderr.read()
    app = WebApp(root, live=False)
    app.data.ttl = 0.0  # no page cache: each request reads the config as it is now
    server, _ = start_in_thread(app, port=0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        # training: 200, progress, metrics that do not exist yet as "–"
        status, _, html = get(url, "/")
        assert status == 200
        row = _sae_row(html, "slow")
        assert re.search(r"training \d+% \([\d,]+ / 10,000,000 tokens\)", row), row
        assert "/ 10,000,000" in row and row.count("–") >= 4 and "stalled" not in row
        status, _, html = get(url, "/sae/slow")
        assert status == 200 and 'id="status"' in html and "training" in html and "stalled" not in html
        code, out, _ = cli("show", "--lake", root, "slow")
        assert code == 0 and "[training " in out
        code, out, _ = cli("ls", "--lake", root)
        assert code == 0 and "training " in out and "stalled" not in out

        # stopped (alive, no heartbeat): stalled once the heartbeat is older than SAELAKE_STALE_AFTER
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(STALE_AFTER_S + 1.5)
        status, _, html = get(url, "/")
        assert status == 200
        row = _sae_row(html, "slow")
        assert "stalled (no heartbeat since" in row and f"limit {STALE_AFTER_S} s" in row, row
        code, out, _ = cli("show", "--lake", root, "slow")
        assert code == 0 and "[stalled (no heartbeat since" in out
        code, out, _ = cli("ls", "--lake", root)
        assert code == 0 and "stalled (no heartbeat since" in out

        # beating again: training again
        os.kill(proc.pid, signal.SIGCONT)
        _wait(lambda: "stalled" not in _sae_row(get(url, "/")[2], "slow"), 60, "a fresh heartbeat")

        # killed: the process is gone, the record stays "training" on disk; the pages say stalled
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for path in ("/", "/sae/slow", "/run/r1"):
            status, _, html = get(url, path)
            assert status == 200, (path, status)
        row = _sae_row(get(url, "/")[2], "slow")
        assert f"its process {proc.pid} is gone" in row and "stalled (no heartbeat since" in row, row
        html = get(url, "/sae/slow")[2]
        assert "stalled" in html and "lake train --resume" in html
        assert re.search(r"held-out \(– tokens\) FVU</th><td>–", html), "held-out metrics do not exist yet"
    finally:
        server.shutdown()
        server.server_close()


def test_stalled_rule(monkeypatch):
    """Records without a heartbeat (written before heartbeats existed) fall back to `updated`; a live
    process with a fresh heartbeat is not stalled; the default limit follows the writer's interval."""
    from datetime import UTC, datetime, timedelta

    from saelake.lake.heartbeat import STALE_MIN_S, beat, shown_status, stale_after, stalled

    monkeypatch.delenv("SAELAKE_STALE_AFTER", raising=False)
    old = (datetime.now(UTC) - timedelta(hours=3)).isoformat(timespec="seconds")
    assert "stalled (no heartbeat since" in stalled({"status": "training", "updated": old}) and "3 h ago" in stalled(
        {"status": "training", "updated": old}
    )
    fresh = {"status": "training", **beat(30.0), "progress": {"tokens": 1000, "tokens_total": 4000}}
    assert stalled(fresh) is None and shown_status(fresh) == "training 25% (1,000 / 4,000 tokens)"
    assert stalled({"status": "complete", "updated": old}) is None
    assert stale_after(fresh) == STALE_MIN_S and stale_after({"heartbeat_every_s": 100}) == 400
    monkeypatch.setenv("SAELAKE_STALE_AFTER", "5")
    assert stale_after(fresh) == 5
