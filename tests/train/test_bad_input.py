"""What bad input gets: one clear line, exit status 2, nothing registered."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from saelake.lake import Lake, UserError
from saelake.train import SAEStore, load_sae
from tests.train.conftest import H1, lake_main

BASE = [
    "--run",
    "r1",
    "--hook",
    H1,
    "--arch",
    "topk",
    "--k",
    "4",
    "--expansion",
    "2",
    "--tokens",
    "512",
    "--batch-size",
    "256",
    "--quiet",
]

TOP = f'run = "r1"\nhook = "{H1}"\n'
SWEEPS = {
    "unknown_key": (TOP + 'tokens = 512\n[[sae]]\narch = "topk"\n[[sae]]\nkk = 3\n', "entry 2: unknown key 'kk'"),
    "wrong_type": (TOP + 'tokens = 512\n[[sae]]\nk = "eight"\n', "entry 1: key 'k' must be an integer"),
    "no_sae": (TOP + "tokens = 512\n", "no [[sae]] entries"),
    "source_in_entry": (TOP + "[[sae]]\ntokens = 5\n", "entry 1: key 'tokens' is shared"),
    "top_unknown": (TOP + "tokenz = 5\n[[sae]]\n", "(top level): unknown key 'tokenz'"),
    "key_of_another_kind": (
        TOP + 'tokens = 512\n[[sae]]\narch = "relu"\nk = 4\n',
        "entry 1: key 'k' does not apply to arch 'relu' (its keys: l1, sparsity_warmup)",
    ),
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
    **({} if torch.cuda.is_available() else {"cuda missing": (["--device", "cuda"], "no CUDA device")}),
    "resume nothing": (["--name", "ghost", "--resume"], "no SAE 'ghost' to resume"),
}


def _nothing_registered(lake, before=()):
    assert sorted(SAEStore(lake).names()) == sorted(before)
    if Lake(lake).catalog.path.exists():
        assert [r[0] for r in Lake(lake).query("select name from saes")[1]] == [
            n for n in sorted(before) if SAEStore(lake).config(n).get("status") == "complete"
        ]


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
    code, out, err = lake_main(
        "train",
        "--lake",
        lake_dir,
        *BASE,
        "--tokens",
        "2048",
        "--name",
        "s2",
        "--checkpoint-every",
        "2",
        "--stop-after",
        "2",
    )
    assert code == 0 and "interrupted" in out, err
    code, _, err = lake_main(
        "train", "--lake", lake_dir, *BASE, "--tokens", "2048", "--name", "s2", "--k", "5", "--resume"
    )
    _one_line_error(code, err, "--resume with a different config: SAE s2 key 'k' was 4, now 5")
    _nothing_registered(lake_dir, ["s1", "s2"])


def test_eval_export_bad_input(lake_dir, tmp_path):
    code, _, err = lake_main("eval", "--lake", lake_dir, "nope")
    _one_line_error(code, err, "no SAE 'nope'")
    code, _, err = lake_main("export", "--lake", lake_dir, "nope", "-o", str(tmp_path / "x"))
    _one_line_error(code, err, "no SAE 'nope'")
    code, _, err = lake_main("import", "--lake", lake_dir, str(tmp_path), "--name", "x")
    _one_line_error(code, err, "is not a dictionary folder saelake reads")
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize(
    "device,expected",
    [("tpu", "--device 'tpu' is not a device torch knows"), ("meta", "--device meta: torch cannot use it here")],
)
def test_device_torch_cannot_use(lake_dir, device, expected):
    code, _, err = lake_main("train", "--lake", lake_dir, *BASE, "--name", "bad", "--device", device)
    _one_line_error(code, err, expected)
    _nothing_registered(lake_dir)


def test_sweep_file_that_is_not_text(lake_dir, tmp_path):
    (tmp_path / "s.toml").write_bytes(bytes(range(256)) * 4)
    code, _, err = lake_main("train", "--lake", lake_dir, "--config", str(tmp_path / "s.toml"), "--quiet")
    _one_line_error(code, err, "not a text file (a sweep file is TOML, UTF-8)")
    code, _, err = lake_main("train", "--lake", lake_dir, "--config", str(tmp_path), "--quiet")
    _one_line_error(code, err, "is a folder: give a TOML file")
    code, _, err = lake_main("train", "--lake", lake_dir, "--config", str(tmp_path / "s.toml"), "--k", "8")
    _one_line_error(code, err, "with --config, SAE settings go in the sweep file, not on the command line: --k")
    _nothing_registered(lake_dir)


def test_option_of_another_kind(lake_dir):
    code, _, err = lake_main("train", "--lake", lake_dir, *BASE, "--name", "bad", "--arch", "relu")
    _one_line_error(code, err, "--k: not an option of --arch relu (its options: --l1, --sparsity-warmup)")
    _nothing_registered(lake_dir)


@pytest.fixture
def trained(lake_dir):
    code, _, err = lake_main("train", "--lake", lake_dir, *BASE, "--name", "s1")
    assert code == 0, err
    return lake_dir


def test_export_refuses_a_file_or_a_non_empty_folder(trained, tmp_path):
    (tmp_path / "file").write_text("keep me")
    code, _, err = lake_main("export", "--lake", trained, "s1", "-o", str(tmp_path / "file"))
    _one_line_error(code, err, "exists and is not a folder")
    assert (tmp_path / "file").read_text() == "keep me"
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    code, _, err = lake_main("export", "--lake", trained, "s1", "-o", str(full))
    _one_line_error(code, err, "is not empty: give an empty or new folder, or pass --force")
    assert sorted(p.name for p in full.iterdir()) == ["notes.txt"]
    code, _, err = lake_main("export", "--lake", trained, "s1", "-o", str(full), "--force")
    assert code == 0, err
    assert sorted(p.name for p in full.iterdir()) == ["cfg.json", "notes.txt", "sae_weights.safetensors"]


class _Boom:
    """Unpickling this creates a file: proof that a pickle was (never) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_import_refuses_corrupt_pickled_and_bad_files(trained, tmp_path):
    good = tmp_path / "good"
    code, _, err = lake_main("export", "--lake", trained, "s1", "-o", str(good))
    assert code == 0, err
    marker = tmp_path / "unpickled"
    cases = {
        "corrupt weights": (
            "sae_weights.safetensors",
            b"\x07" * 64 + good.joinpath("sae_weights.safetensors").read_bytes()[64:],
            "sae_weights.safetensors is not a readable safetensors file",
        ),
        "pickled weights": (
            "sae_weights.safetensors",
            pickle.dumps({"W_enc": _Boom(str(marker))}),
            "sae_weights.safetensors is not a readable safetensors file",
        ),
        "cfg not json": ("cfg.json", b"{architecture: topk", "cfg.json is not valid JSON"),
        "cfg not an object": ("cfg.json", b"[1, 2]", "cfg.json must hold a JSON object, not list"),
        "cfg binary": ("cfg.json", bytes(range(256)), "cfg.json is not valid JSON"),
        "cfg bad key": ("cfg.json", json.dumps({"architecture": 3}).encode(), "key 'architecture' must be a string"),
    }
    for case, (fname, data, expected) in cases.items():
        folder = tmp_path / case.replace(" ", "-")
        shutil.copytree(good, folder)
        (folder / fname).write_bytes(data)
        code, _, err = lake_main("import", "--lake", trained, str(folder), "--name", "back")
        _one_line_error(code, err, expected)
    assert not marker.exists()
    _nothing_registered(trained, ["s1"])


def test_damaged_weights_and_config_are_named(trained):
    weights = Path(trained) / "saes" / "s1" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])  # flip bytes inside a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"SAE 's1': .*weights.safetensors is damaged .*weights_sha256"):
        load_sae(trained, "s1")
    code, _, err = lake_main("export", "--lake", trained, "s1", "-o", str(Path(trained).parent / "out"))
    _one_line_error(code, err, "weights.safetensors is damaged")
    config = Path(trained) / "saes" / "s1" / "config.json"
    config.write_text(config.read_text().replace('"d_sae": 64', '"d_sae": "many"'))
    code, _, err = lake_main("show", "--lake", trained, "s1")
    _one_line_error(code, err, "saes/s1/config.json: key 'd_sae' must be an integer, not 'many'")
