"""Shared fixtures: a tiny real model, a tiny corpus, an S3 server, a Mongo server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run tiny models in several processes at once on 2 cores: one thread each avoids
# oversubscription (5x slower with 2 threads per process on busy cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
TEXT = Path(__file__).parent / "data" / "corpus.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_model(path: Path, n_layers: int = 2, d_model: int = 32, n_ctx: int = 64, seed: int = 0) -> Path:
    """A random GPT-2-style model + a BPE tokenizer trained offline on the test corpus (the same tokenizer
    whatever the ``seed`` of the weights: models of several seeds stand in for checkpoints of one model)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT.read_text().split("\n\n"), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>"
    )
    bos = fast.convert_tokens_to_ids("<|endoftext|>")
    cfg = GPT2Config(
        vocab_size=len(fast),
        n_positions=n_ctx,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=4,
        bos_token_id=bos,
        eos_token_id=bos,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_corpus() -> str:
    return str(TEXT)


@pytest.fixture(autouse=True)
def _saelake_home(tmp_path_factory, monkeypatch):
    """Model cache and remote-lake catalogs go to a temp dir, never ~/.cache."""
    home = os.environ.get("SAELAKE_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "saelake-home")
    monkeypatch.setenv("SAELAKE_HOME", home)


def run_cli(*args: str, env: dict | None = None, check: bool = False, timeout: int = 300):
    """Run the real `lake` CLI in a subprocess (as users do)."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run(
        [sys.executable, "-m", "saelake.lake", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"lake {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP server (moto) on 127.0.0.1; yields the env a client needs."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_REGION": "us-east-1",
    }
    yield env
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """S3 credentials in this process's environment plus a fresh bucket."""
    import uuid

    import boto3

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    boto3.client(
        "s3",
        endpoint_url=s3_server["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    return {**s3_server, "bucket": bucket}


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory):
    """A real MongoDB wire-protocol server (nx-27017) on 127.0.0.1; yields its URI."""
    port = free_port()
    exe = Path(sys.executable).parent / "nx-27017"
    state = tmp_path_factory.mktemp("nx")  # its own pid file: the default one is shared machine-wide
    proc = subprocess.Popen(
        [
            str(exe),
            "--db",
            "memory",
            "-p",
            str(port),
            "--pid-file",
            str(state / "nx.pid"),
            "--log-file",
            str(state / "nx.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"nx-27017 did not start on port {port}: see {state / 'nx.log'}") from None
            time.sleep(0.05)
    yield f"mongodb://127.0.0.1:{port}/"
    proc.terminate()
    proc.wait(5)


HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def ingest_tiny(lake: str, model: str, corpus: str, run: str = "r1", tokens: int = 4000, **kw) -> dict:
    from saelake.lake import IngestConfig, ingest

    cfg = IngestConfig(
        lake=lake,
        model=model,
        dataset=corpus,
        hooks=kw.pop("hooks", HOOKS),
        tokens=tokens,
        context_size=kw.pop("context_size", 32),
        run=run,
        shuffle_buffer=kw.pop("shuffle_buffer", 1024),
        **kw,
    )
    return ingest(cfg, progress=False)


@pytest.fixture(scope="session")
def tiny_lake(tmp_path_factory, tiny_model, tiny_corpus) -> str:
    """A lake with run r1: the tiny model over the tiny corpus, two hooks, 1d + 2d. Read-only for tests."""
    lake = str(tmp_path_factory.mktemp("lakes") / "tiny")
    ingest_tiny(lake, tiny_model, tiny_corpus)
    return lake


def cli(*args: str) -> tuple[int, str, str]:
    """Run the `lake` CLI in-process (fast); returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from saelake.lake.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()
