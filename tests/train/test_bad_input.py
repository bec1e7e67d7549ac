"""What bad input gets: one clear line, exit status 2, nothing registered."""
from __future__ import annotations

import os

import pytest
from tests.train.conftest import H1, lake_main

from saelake.lake import Lake
from saelake.train import SAEStore

BASE = ["--run", "r1", "--hook", H1, "--arch", "topk", "--k", "4", "--expansion", "2", "--tokens", "512",
        "--batch-size", "256", "--quiet"]

SWEEPS = {
    "unknown_key": ('run = "r1"\nhook = "%s"\ntokens = 512\n[[sae]]\narch = "topk"\n[[sae]]\nkk = 3\n' % H1,
                    "entry 2: unknown key 'kk'"),
    "wrong_type": ('run = "r1"\nhook = "%s"\ntokens = 512\n[[sae]]\nk = "eight"\n' % H1,
                   "entry 1: key 'k' must be an integer"),
    "no_sae": ('run = "r1"\nhook = "%s"\ntokens = 512\n' % H1, "no [[sae]] entries"),
    "source_in_entry": ('run = "r1"\nhook = "%s"\n[[sae]]\ntokens = 5\n' % H1, "entry 1: key 'tokens' is shared"),
    "top_unknown": ('run = "r1"\nhook = "%s"\ntokenz = 5\n[[sae]]\n' % H1, "(top level): unknown key 'tokenz'"),
}

CASES = {
    "unknown run": (["--run", "nope"], "no run 'nope'"),
    "unknown hook": (["--hook", "blocks.9.hook_resid_post"], "hook 'blocks.9.hook_resid_post' is not in run 'r1'"),
    "unknown version": (["--version", "7"], "snapshot versions 1..1, not 7"),
    "out-hook missing": (["--out-hook", "blocks.0.hook_mlp_out"], "hook 'blocks.0.hook_mlp_out' is not in run"),
    "k >= d_sae": (["--k", "64"], "k must be in 1..d_sae-1 (63), got 64"),
    "k <= 0": (["--k", "0"], "k must be in 1..d_sae-1"),
    "expansion <= 0": (["--expansion", "0"], "--expansion must be positive"),
    "d_sae <= 0": (["--d-sae", "-3"], "--d-sae must be positive"),
    "tokens > snapshot": (["--tokens", "100000"], "--tokens 100000 is more than snapshot r1 v1"),
    "bad name": (["--name", "../x"], "invalid SAE name"),
    "cuda missing": (["--device", "cuda"], "no CUDA device"),
    "resume nothing": (["--name", "ghost", "--resume"], "no SAE 'ghost' to resume"),
}


def _nothing_registered(lake, before=()):
    assert sorted(SAEStore(lake).names()) == sorted(before)
    if Lake(lake).catalog.path.exists():
        assert [r[0] for r in Lake(lake).query("select name from saes")[1]] == [
            n for n in sorted(before) if SAEStore(lake).config(n).get("status") == "complete"]


def _one_line_error(code, err, expected):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


@pytest.mark.parametrize("case", CASES)
def test_bad_cli_input(lake_dir, case):
    extra, expected = CASES[case]
    args = BASE + extra
    if "--name" not in extra:
        args += ["--name", "bad"]
    code, _, err = lake_main("train", "--lake", lake_dir, *args)
    _one_line_error(code, err, expected)
    _nothing_registered(lake_dir)


@pytest.mark.parametrize("case", SWEEPS)
def test_bad_sweep_file(lake_dir, tmp_path, case):
    text, expected = SWEEPS[case]
    (tmp_path / "s.toml").write_text(text)
    code, _, err = lake_main("train", "--lake", lake_dir, "--config", str(tmp_path / "s.toml"), "--quiet")
    _one_line_error(code, err, expected)
    _nothing_registered(lake_dir)


def test_name_taken_and_resume_with_other_config(lake_dir):
    code, _, err = lake_main("train", "--lake", lake_dir, *BASE, "--name", "s1")
    assert code == 0, err
    before = SAEStore(lake_dir).config("s1")
    code, _, err = lake_main("train", "--lake", lake_dir, *BASE, "--name", "s1")
    _one_line_error(code, err, "SAE name 's1' is taken")
    code, _, err = lake_main("train", "--lake", lake_dir, *BASE, "--name", "s1", "--resume")
    _one_line_error(code, err, "SAE 's1' is already complete")
    assert SAEStore(lake_dir).config("s1") == before
    # an interrupted run resumed with another k
    code, out, err = lake_main("train", "--lake", lake_dir, *BASE, "--tokens", "2048", "--name", "s2",
                               "--checkpoint-every", "2", "--stop-after", "2")
    assert code == 0 and "interrupted" in out, err
    code, _, err = lake_main("train", "--lake", lake_dir, *BASE, "--tokens", "2048", "--name", "s2", "--k", "5",
                             "--resume")
    _one_line_error(code, err, "--resume with a different config: SAE s2 key 'k' was 4, now 5")
    _nothing_registered(lake_dir, ["s1", "s2"])


def test_eval_export_bad_input(lake_dir, tmp_path):
    code, _, err = lake_main("eval", "--lake", lake_dir, "nope")
    _one_line_error(code, err, "no SAE 'nope'")
    code, _, err = lake_main("export", "--lake", lake_dir, "nope", "-o", str(tmp_path / "x"))
    _one_line_error(code, err, "no SAE 'nope'")
    code, _, err = lake_main("import", "--lake", lake_dir, str(tmp_path), "--name", "x")
    _one_line_error(code, err, "is not a SAELens SAE folder")
    assert not os.path.exists(tmp_path / "x")
