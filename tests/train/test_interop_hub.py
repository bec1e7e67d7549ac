"""``lake import hf://ORG/REPO[/SUBFOLDER][@REVISION]`` offline, against a hub cache laid out as
huggingface_hub lays it out (models--ORG--REPO/{refs,blobs,snapshots}), with HF_HUB_OFFLINE set."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from saelake.train import SAEStore, load_sae
from tests.conftest import cli
from tests.train.test_interop_peers import PEERS, rows

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache: Path, repo: str, folders: dict[str, Path], commit: str = COMMIT) -> None:
    """huggingface_hub's cache layout: files as blobs named by their hash, linked from the commit's snapshot."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for sub, src in folders.items():
        for f in src.iterdir():
            data = f.read_bytes()
            blob = base / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            link = base / "snapshots" / commit / sub / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path("../" * (len(Path(sub).parts) + 2)) / "blobs" / blob.name)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    fill_cache(
        cache, "org/saes", {"layers/h.0": PEERS / "sparsify" / "h.0", "jumprelu": PEERS / "saelens" / "jumprelu"}
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_import_from_the_hub_cache(tmp_path, hub_cache):
    lake = str(tmp_path / "lake")
    code, out, err = cli("import", "--lake", lake, "hf://org/saes/layers/h.0", "--name", "sp")
    assert code == 0, err
    assert "(sparsify) as sp: topk" in out
    cfg = SAEStore(lake).config("sp")
    assert cfg["imported_from"] == f"hf://org/saes/layers/h.0@{COMMIT}"
    code, out, err = cli("import", "--lake", lake, f"hf://org/saes/jumprelu@{COMMIT}", "--name", "jr")
    assert code == 0, err
    sae, cfg = load_sae(lake, "jr")
    assert cfg["arch"] == "jumprelu" and cfg["import_format"] == "saelens"
    local, _ = load_sae(lake, "sp")
    shutil.rmtree(hub_cache)  # imported: the lake holds its own copy
    with torch.no_grad():
        assert local.encode(rows("blocks.0.hook_resid_post")).l0()[0] > 0


@pytest.mark.parametrize(
    "source,msg",
    [
        ("hf://org/other/x", "is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
        ("hf://org/saes/nothere", "has no folder 'nothere'"),
        ("hf://org/saes/layers@" + "f" * 40, "is not in the Hugging Face cache"),
        ("hf://justname", "not a hub address"),
        ("hf://org/saes/layers", "several hookpoints (h.0)"),
    ],
)
def test_hub_errors_are_one_line(tmp_path, hub_cache, source, msg):
    code, out, err = cli("import", "--lake", str(tmp_path / "lake"), source, "--name", "x")
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not SAEStore(str(tmp_path / "lake")).exists("x")
