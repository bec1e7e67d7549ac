"""Fixtures for the trainer tests: one real tiny-model snapshot shared by the session."""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import cli as lake_main  # noqa: F401  (the in-process CLI, as train tests call it)

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"]
H0, H1, MLP_IN, MLP_OUT = HOOKS


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny matmuls: OpenMP thread hand-offs cost more than they save on 2 shared cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory, tiny_model, tiny_corpus):
    """A lake with run r1: 4 hooks of the tiny model, 1d + 2d, ~4k tokens."""
    from saelake.lake import IngestConfig, ingest

    root = str(tmp_path_factory.mktemp("trainlake") / "lake")
    os.environ.setdefault("SAELAKE_HOME", str(tmp_path_factory.getbasetemp() / "saelake-home"))
    ingest(
        IngestConfig(
            lake=root,
            model=tiny_model,
            dataset=tiny_corpus,
            hooks=HOOKS,
            tokens=4000,
            context_size=32,
            layouts=["1d", "2d"],
            run="r1",
        ),
        progress=False,
    )
    return {"lake": root, "model": tiny_model, "corpus": tiny_corpus, "run": "r1"}


@pytest.fixture
def lake_dir(snapshot, tmp_path):
    """A fresh copy of the snapshot lake per test (SAE names and catalog start empty)."""
    import shutil

    dst = tmp_path / "lake"
    shutil.copytree(snapshot["lake"], dst, ignore=shutil.ignore_patterns("saes", "catalog.duckdb*"))
    return str(dst)
