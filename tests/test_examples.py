"""Every example runs (tiny sizes, tiny model) and prints what it made."""

import subprocess
import sys

from tests.conftest import REPO


def _run(script, *args):
    p = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_generate_activations_examples(tmp_path, tiny_model, tiny_corpus):
    common = [
        "--lake",
        str(tmp_path / "lake"),
        "--model",
        tiny_model,
        "--dataset",
        tiny_corpus,
        "--hooks",
        "blocks.1.hook_resid_post",
        "--tokens",
        "1000",
        "--context-size",
        "32",
    ]
    out = _run("generate_activations_1d.py", *common)
    assert "run acts-1d:" in out and "token rows" in out
    out = _run("generate_activations_2d.py", *common)
    assert "run acts-2d:" in out and "(8, 32, 32)" in out and "contexts of 32 tokens" in out


def test_demo_runs_the_whole_pipeline(tmp_path, tiny_model, tiny_corpus):
    lake = tmp_path / "lake"
    out = _run(
        "demo.py",
        "--lake",
        str(lake),
        "--model",
        tiny_model,
        "--dataset",
        tiny_corpus,
        "--hook",
        "blocks.1.hook_resid_post",
        "--tokens",
        "2000",
        "--context-size",
        "32",
        "--train-tokens",
        "4000",
        "--analyze-tokens",
        "1000",
    )
    assert "demo done" in out and "lake serve --lake" in out
    assert (lake / "pareto.png").stat().st_size > 10_000
    from saelake.lake import Lake

    names, rows = Lake(str(lake)).query("select count(*) from saes")
    assert rows == [(3,)]
    names, rows = Lake(str(lake)).query("select count(*) from analyses")
    assert rows == [(1,)]
