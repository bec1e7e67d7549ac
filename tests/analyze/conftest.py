"""Fixtures for the analysis tests: a copy of the tiny lake with real SAEs in its store."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import cli, free_port  # noqa: F401  (re-exported to the tests here)

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"


def make_sae(
    lake: str,
    name: str,
    arch: str = "topk",
    hook: str = H0,
    d_in: int = 32,
    d_sae: int = 64,
    k: int | None = 4,
    run: str | None = "r1",
    version: int | None = 1,
    seed: int = 0,
    bias: float = 0.0,
    model: str | None = None,
) -> dict:
    """A real dictionary of kind ``arch`` (tied random init), saved through train's SAEStore like a trained one."""
    from saelake.train import dictionaries
    from saelake.train.store import SAEStore

    topk = arch in ("topk", "batchtopk")  # encoder = decoder transposed, both unit rows: it inverts the decoder
    sae = dictionaries.get(arch).build(d_in, d_sae, k=k if topk else None, init_encoder_norm=1.0 if topk else None)
    sae.initialize([torch.Generator().manual_seed(seed)], dec_norm=1.0)
    with torch.no_grad():
        sae.b_enc.fill_(bias)
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    cfg = {
        "name": name,
        "arch": arch,
        "hook": hook,
        "out_hook": hook,
        "hooks": [hook],
        "out_hooks": [hook],
        "d_in": d_in,
        "d_sae": d_sae,
        "d_out": d_in,
        "k": k if arch in ("topk", "batchtopk") else None,
        "run": run,
        "version": version,
        "model": model,
        "status": "complete",
        "apply_b_dec_to_input": True,
        "created": "2026-01-01T00:00:00+00:00",
    }
    SAEStore(lake).save(cfg, sae.member_state(0))
    return cfg


@pytest.fixture(scope="session")
def alake(tmp_path_factory, tiny_lake, tiny_model) -> str:
    """The tiny lake (run r1) plus SAEs: topk (hook 0, 64 latents, k 4), relu (hook 1, 48 latents)."""
    dst = tmp_path_factory.mktemp("analyze") / "lake"
    shutil.copytree(tiny_lake, dst, ignore=shutil.ignore_patterns("catalog.duckdb*"))
    make_sae(str(dst), "topk", "topk", H0, model=tiny_model)
    make_sae(str(dst), "relu", "relu", H1, d_sae=48, k=None, bias=-0.05, seed=3, model=tiny_model)
    return str(dst)


@pytest.fixture
def lake_copy(alake, tmp_path) -> str:
    """A writable copy of ``alake`` for one test."""
    dst = tmp_path / "lake"
    shutil.copytree(alake, dst)
    return str(dst)
