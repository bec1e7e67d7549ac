"""Reader benchmark: can the lake feed a trainer? Tokens/s that ``SnapshotSource.token_batches``
delivers as float32 tensors, against the raw Lance scan of the same column as the limit.

For each storage dtype it ingests (once, cached under --lake) the bundled model's
--hook over the built-in corpus, then in a fresh subprocess per configuration measures

  raw      lance dataset.scanner(columns=[hook column], batch_size=4096).to_batches(), each batch's
           values buffer touched (the most a reader of that column can get; codes not decoded)
  reader   SnapshotSource(...).token_batches(4096, [hook], seed=0, dtype=torch.float32): float32
           tensors, what a trainer consumes (shuffled blocks, decoded and converted in the reader's thread)

on local disk and on a moto S3 server (a separate process on 127.0.0.1), with 1 and 2 threads
(torch and Lance's CPU threads). Target: reader >= 0.8x raw for float16 and int8 on local disk.

    python bench/reader.py                         # 200k tokens, float16,int8,float8,bfloat16,float32
    python bench/reader.py --write                 # ... and update the "## reader" section of bench/RESULTS.md
    python bench/reader.py --model PATH --dataset FILE --hook blocks.0.hook_resid_post --tokens 4000 \
        --context-size 32 --dtypes float16,int8 --no-s3     # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import benchlib  # noqa: E402  (sets the offline environment)

ROOT = Path(__file__).resolve().parent.parent
BATCH = 4096


def measure(args) -> dict:
    """One configuration, in this (fresh) process: raw scan and reader, interleaved, best of --repeats."""
    import torch

    torch.set_num_threads(int(args.threads))
    from saelake.lake import Lake, SnapshotSource

    lake = Lake(args.lake_uri)
    src = SnapshotSource(lake, args.run)
    col = src.columns[args.hook]
    ds = lake.dataset(args.run, "tokens", src.snapshot.tables["tokens"])
    rows = ds.count_rows()

    def raw() -> float:
        t = time.perf_counter()
        n = 0
        for b in ds.scanner(columns=[col], batch_size=BATCH).to_batches():
            values = b.column(0).flatten()
            n += len(b)
            values.buffers()[-1]  # the values buffer: what the scan handed over
        return n / (time.perf_counter() - t)

    def reader() -> float:
        t = time.perf_counter()
        n = 0
        for b in src.token_batches(BATCH, [args.hook], seed=0, dtype=torch.float32):
            x = b.acts[args.hook]
            n += x.shape[0]
        return n / (time.perf_counter() - t)

    raw()  # warm the page cache / object store connection once
    best = {"raw": 0.0, "reader": 0.0}
    for _ in range(args.repeats):
        best["raw"] = max(best["raw"], raw())
        best["reader"] = max(best["reader"], reader())
    return {"rows": rows, **best}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_run(a, dtype: str) -> str:
    """The run for one dtype in the local bench lake (ingested once)."""
    run = f"reader-{dtype}-{a.tokens}"
    benchlib.ensure_run(
        a.lake,
        run,
        model=a.model,
        dataset=a.dataset,
        hook=a.hook,
        tokens=a.tokens,
        context_size=a.context_size,
        dtype=dtype,
    )
    return run


def bytes_per_token(lake_dir: str, run: str, tokens_rows: int) -> float:
    data = Path(lake_dir) / "runs" / run / "tokens.lance" / "data"
    return sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) / tokens_rows


def run_config(a, uri: str, run: str, threads: int, env: dict) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--measure",
        "--lake-uri",
        uri,
        "--run",
        run,
        "--hook",
        a.hook,
        "--threads",
        str(threads),
        "--repeats",
        str(a.repeats),
    ]
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": str(threads), "LANCE_CPU_THREADS": str(threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"measurement failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def start_s3(a, runs: list[str]):
    """A moto S3 server in its own process, with the bench runs copied into a bucket."""
    import s3fs

    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
    }
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline:
                raise SystemExit("moto_server did not start") from None
            time.sleep(0.1)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("bench")
    for run in runs:
        fs.put(str(Path(a.lake) / "runs" / run), f"bench/lake/runs/{run}", recursive=True)
    return proc, env, "s3://bench/lake"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lake", default=str(Path.home() / ".cache" / "saelake-bench" / "reader-lake"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="builtin")
    p.add_argument("--hook", default="blocks.3.hook_resid_post")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--dtypes", default="float16,int8,float8,bfloat16,float32")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--s3-dtypes", default="float16,int8", help="dtypes also measured on S3 (each is uploaded)")
    p.add_argument("--write", action="store_true", help="update the '## reader' section of bench/RESULTS.md")
    # internal: one measurement in a fresh process
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lake-uri", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(a)))
        return

    dtypes = a.dtypes.split(",")
    threads = [int(t) for t in a.threads.split(",")]
    runs = {d: ensure_run(a, d) for d in dtypes}
    stores = [("local", a.lake, {})]
    s3 = None
    if not a.no_s3:
        s3_dtypes = [d for d in a.s3_dtypes.split(",") if d in runs]
        s3, env, uri = start_s3(a, [runs[d] for d in s3_dtypes])
        stores.append(("s3", uri, env))
    results = []
    try:
        for store, uri, env in stores:
            for d in dtypes if store == "local" else s3_dtypes:
                for t in threads:
                    r = run_config(a, uri, runs[d], t, env)
                    r |= {
                        "store": store,
                        "dtype": d,
                        "threads": t,
                        "bytes_per_token": bytes_per_token(a.lake, runs[d], r["rows"]),
                    }
                    results.append(r)
                    print(
                        f"{store:5s} {d:8s} threads {t}: raw {r['raw']:>9,.0f} tok/s  reader {r['reader']:>9,.0f} "
                        f"tok/s  ({r['reader'] / r['raw']:.2f}x raw)  {r['bytes_per_token']:.0f} B/token",
                        flush=True,
                    )
    finally:
        if s3 is not None:
            s3.terminate()
    if a.write:
        write_results(a, results)


def write_results(a, results: list[dict]) -> None:
    load = os.getloadavg()[0]
    lines = [
        "## reader",
        "",
        f"`python bench/reader.py` ({a.tokens:,} tokens of `{a.hook}`, bundled model, batch {BATCH}, best of "
        f"{a.repeats}; {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the end). "
        "raw = Lance scan of the column; reader = `SnapshotSource.token_batches` as float32 tensors "
        "(decoded, shuffled blocks). B/token = the 1d table's data files / rows.",
        "",
        "| store | dtype | threads | raw tok/s | reader tok/s | reader/raw | B/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['store']} | {r['dtype']} | {r['threads']} | {r['raw']:,.0f} | {r['reader']:,.0f} | "
            f"{r['reader'] / r['raw']:.2f} | {r['bytes_per_token']:.0f} |"
        )
    section = "\n".join(lines) + "\n"
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text()
    start = text.find("## reader")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end < 0 else text[end:])
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
