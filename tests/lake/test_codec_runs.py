"""Runs stored with each codec: readers decode inside (callers only ever see floats of d_model
width), values stay within the codec's error of a float32 run of the same tokens, 2d tables,
--append, --resume after a SIGKILL and `lake query` all work with every codec."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pytest
import torch

from saelake.lake import Lake, SnapshotSource
from tests.conftest import HOOKS, REPO, cli, ingest_tiny

# relative error (Frobenius) of a whole run against float32: int8's half step per 64-channel block,
# e4m3's 3 mantissa bits, bfloat16's 8 bits
BOUNDS = {"float16": 1e-3, "bfloat16": 8e-3, "int8": 0.02, "float8": 0.06}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, tiny_corpus):
    lake = str(tmp_path_factory.mktemp("codecs") / "lake")
    for dtype in ["float32", *BOUNDS]:
        ingest_tiny(lake, tiny_model, tiny_corpus, run=dtype, tokens=2000, dtype=dtype)
    return lake


def _tokens(lake, run):
    b = next(SnapshotSource(lake, run).token_batches(100_000, seed=0))
    return b


@pytest.mark.parametrize("dtype", list(BOUNDS))
def test_readers_decode_every_codec_within_its_bound(runs, dtype):
    ref, got = _tokens(runs, "float32"), _tokens(runs, dtype)
    assert torch.equal(ref.context_id, got.context_id) and torch.equal(ref.position, got.position)
    m = Lake(runs).manifest(dtype)
    assert m.codecs == {h: dtype for h in HOOKS}
    for h in HOOKS:
        x, y = ref.acts[h].float(), got.acts[h]
        d = m.d_model[h]
        assert y.shape == x.shape == (len(ref), d)  # never the wider cells of codes + scales
        assert y.dtype == (torch.float32 if dtype in ("int8", "float8") else getattr(torch, dtype))
        assert ((y.float() - x).norm() / x.norm()) < BOUNDS[dtype]
    # 2d: the same contexts, decoded the same way
    c_ref = next(SnapshotSource(runs, "float32").context_batches(1000))
    c_got = next(SnapshotSource(runs, dtype).context_batches(1000))
    for h in HOOKS:
        x, y = c_ref.acts[h].float(), c_got.acts[h]
        assert y.shape == x.shape and ((y.float() - x).norm() / x.norm()) < BOUNDS[dtype]


def test_int8_and_float8_take_about_half_and_a_quarter_of_float32(runs):
    def column_bytes(run):
        ds = lance.dataset(f"{runs}/runs/{run}/tokens.lance")
        col = ds.schema.field(HOOKS[0].replace(".", "_")).type
        return col.list_size * col.value_type.bit_width // 8

    d = Lake(runs).manifest("int8").d_model[HOOKS[0]]
    assert column_bytes("float16") == 2 * d
    assert column_bytes("int8") == d + 2 * -(-d // 64)  # codes + a float16 scale per 64 channels
    assert column_bytes("float8") == d + 4  # codes + a float32 scale


@pytest.mark.parametrize("dtype", ["int8", "float8"])
def test_query_shows_decoded_values(runs, dtype):
    col = HOOKS[0].replace(".", "_")
    sql = "select context_id, position, {col} from tokens__{run} order by context_id, position limit 3"
    code, out, err = cli("query", "--lake", runs, "--json", sql.format(col=col, run=dtype))
    assert code == 0, err
    rows = json.loads(out)
    ref = json.loads(cli("query", "--lake", runs, "--json", sql.format(col=col, run="float32"))[1])
    for r, f in zip(rows, ref):
        assert len(r[col]) == len(f[col]) == Lake(runs).manifest(dtype).d_model[HOOKS[0]]
        x, y = np.array(f[col]), np.array(r[col])
        assert np.linalg.norm(y - x) / np.linalg.norm(x) < BOUNDS[dtype]


def test_append_keeps_the_codec_and_the_old_snapshot(tmp_path, tiny_model, tiny_corpus):
    lake = str(tmp_path / "lake")
    ingest_tiny(lake, tiny_model, tiny_corpus, run="q", tokens=1000, dtype="int8")
    before = _tokens(lake, "q")
    ingest_tiny(lake, tiny_model, tiny_corpus, run="q", tokens=1000, dtype="int8", append=True)
    v1 = next(SnapshotSource(lake, "q", version=1).token_batches(100_000, seed=0))
    assert torch.equal(v1.acts[HOOKS[0]], before.acts[HOOKS[0]])
    v2 = SnapshotSource(lake, "q", version=2)
    assert v2.n_tokens > v1.acts[HOOKS[0]].shape[0] and v2.codecs == {h: "int8" for h in HOOKS}
    refused = cli(
        "ingest",
        "--lake",
        lake,
        "--model",
        tiny_model,
        "--dataset",
        tiny_corpus,
        "--hooks",
        ",".join(HOOKS),
        "--tokens",
        "1000",
        "--context-size",
        "32",
        "--run",
        "q",
        "--append",
        "--dtype",
        "float16",
        "--quiet",
    )
    assert refused[0] == 2 and "dtype" in refused[2]


def _ingest_cmd(lake, model, corpus, *extra):
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
        "8000",
        "--context-size",
        "32",
        "--run",
        "r1",
        "--shuffle-buffer",
        "256",
        "--dtype",
        "int8",
        "--quiet",
        *extra,
    ]


def test_resume_after_sigkill_gives_the_same_codes(tmp_path, tiny_model, tiny_corpus):
    ref, lake = str(tmp_path / "ref"), str(tmp_path / "lake")
    subprocess.run(_ingest_cmd(ref, tiny_model, tiny_corpus), cwd=REPO, check=True, capture_output=True)
    proc = subprocess.Popen(
        _ingest_cmd(lake, tiny_model, tiny_corpus), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    versions = Path(lake) / "runs" / "r1" / "tokens.lance" / "_versions"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if versions.exists() and len(list(versions.glob("*.manifest"))) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "ingest finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert Lake(lake).manifest("r1").status != "complete"
    subprocess.run(_ingest_cmd(lake, tiny_model, tiny_corpus, "--resume"), cwd=REPO, check=True, capture_output=True)
    for table in ("tokens", "contexts"):
        a = lance.dataset(f"{ref}/runs/r1/{table}.lance").to_table()
        b = lance.dataset(f"{lake}/runs/r1/{table}.lance").to_table()
        key = ["context_id", "position"] if table == "tokens" else ["context_id"]
        assert a.sort_by([(k, "ascending") for k in key]).equals(b.sort_by([(k, "ascending") for k in key]))
