"""Several writers: torchrun ranks on one run, two ingests on one lake, a dying S3 server."""

import subprocess
import sys
import time

import lance
import numpy as np

from saelake.lake import Lake
from tests.conftest import HOOKS, REPO, free_port


def _args(lake, model, corpus, run="r1", tokens="3000", *extra):
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
        tokens,
        "--context-size",
        "32",
        "--run",
        run,
        "--shuffle-buffer",
        "512",
        "--quiet",
        *extra,
    ]


def _sorted_rows(lake, run="r1"):
    t = lance.dataset(f"{lake}/runs/{run}/tokens.lance").to_table()
    t = t.take(np.lexsort((t.column("position").to_numpy(), t.column("context_id").to_numpy())))
    c = lance.dataset(f"{lake}/runs/{run}/contexts.lance").to_table()
    return t, c.take(np.argsort(c.column("context_id").to_numpy()))


def test_torchrun_ingest_equals_single_process(tmp_path, tiny_model, tiny_corpus):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run(_args(one, tiny_model, tiny_corpus), cwd=REPO, check=True, capture_output=True)
    p = subprocess.run(
        _args(two, tiny_model, tiny_corpus, "r1", "3000", "--nproc", "2"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert Lake(two).manifest("r1").status == "complete"
    (t1, c1), (t2, c2) = _sorted_rows(one), _sorted_rows(two)
    assert t1.equals(t2) and c1.equals(c2)  # same rows, same values, same global context ids
    # and the same write-time shuffle: a chunk's rows are in the same order whichever rank wrote it
    a = lance.dataset(f"{one}/runs/r1/tokens.lance").to_table(columns=["context_id", "position"])
    b = lance.dataset(f"{two}/runs/r1/tokens.lance").to_table(columns=["context_id", "position"])
    assert a.equals(b)


def test_two_runs_at_once_and_one_run_twice(tmp_path, tiny_model, tiny_corpus):
    lake = str(tmp_path / "lake")
    procs = [
        subprocess.Popen(
            _args(lake, tiny_model, tiny_corpus, run),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run in ("a", "b")
    ]
    for p in procs:
        assert p.wait(300) == 0, p.stderr.read()
    assert sorted(Lake(lake).run_names()) == ["a", "b"]
    names, rows = Lake(lake).query("select name, status from runs order by 1")
    assert rows == [("a", "complete"), ("b", "complete")]
    # the same run name twice at once: exactly one wins, the other gets one clear line
    procs = [
        subprocess.Popen(
            _args(lake, tiny_model, tiny_corpus, "same"),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    codes = sorted(p.wait(300) for p in procs)
    errs = [p.stderr.read() for p in procs]
    assert codes == [0, 2], errs
    err = next(e for e in errs if "error:" in e)
    assert "'same'" in err and len(err.strip().splitlines()) == 1
    assert Lake(lake).manifest("same").status == "complete"


def test_s3_server_dies_mid_ingest_then_resume(tmp_path, tiny_model, tiny_corpus):
    """The S3 server stops mid-ingest: a clear failure; once it is back, --resume completes."""
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_REGION": "us-east-1",
    }
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()  # moto keeps its state in this process, so a restarted server has the same objects
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="dies")
    uri = "s3://dies/lake"
    args = _args(uri, tiny_model, tiny_corpus, "r1", "12000")
    args[args.index("--shuffle-buffer") + 1] = "256"
    ing = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and ing.poll() is None:  # wait for a few commits
            if s3.list_objects_v2(Bucket="dies", Prefix="lake/runs/r1/tokens.lance/_versions/")["KeyCount"] >= 3:
                break
            time.sleep(0.05)
        server.stop()
        _, err = ing.communicate(timeout=180)
    finally:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
    try:
        assert ing.returncode == 2, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error:") and f"127.0.0.1:{port}" in last and "--resume" in last, err[-2000:]
        assert "testing" not in err
        p = subprocess.run(args + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            os.environ[k] = env[k]
        lk = Lake(uri)
        m = lk.manifest("r1")
        assert m.status == "complete"
        t = lance.dataset(lk.table_uri("r1", "tokens"), storage_options=lk.storage.storage_options).to_table(
            columns=["context_id", "position"]
        )
        keys = t.column("context_id").to_numpy() * 32 + t.column("position").to_numpy()
        assert len(keys) == len(set(keys)) == m.rows_1d  # nothing duplicated
        c = lance.dataset(lk.table_uri("r1", "contexts"), storage_options=lk.storage.storage_options).to_table(
            columns=["context_id"]
        )
        assert sorted(c.column("context_id").to_pylist()) == list(range(m.contexts))  # nothing lost
        assert len(set(t.column("context_id").to_pylist())) == m.contexts
    finally:
        server.stop()
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            os.environ.pop(k, None)
