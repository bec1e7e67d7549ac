"""Write the peer fixtures in tests/data/peers/ (run by hand; the files are committed).

1. Real activations: the tests' tiny model (tests.conftest.make_tiny_model) over two contexts of the
   test corpus, read through saelake at the hooks the fixtures use -> activations.safetensors.
2. Each peer's own code, in its own throwaway venv (they do not install beside TransformerLens 4),
   writes dictionaries in its format and its own forward outputs on those activations:
   peer_saelens.py (SAELens), peer_sparsify.py (EleutherAI sparsify: it also hooks the HF model the way
   its trainer does, so the tests check saelake's hookpoint -> TransformerLens mapping) and
   peer_llamascopium.py (OpenMOSS Llamascopium).

    .venv/bin/python tests/data/peers/make_fixtures.py \\
        --saelens ~/.cache/saelake-test/saelens-venv/bin/python \\
        --sparsify ~/.cache/saelake-bench/sparsify-venv/bin/python \\
        --llamascopium ~/.cache/saelake-test/lms-venv/bin/python

The venvs: ``python -m venv V && V/bin/pip install torch==2.13.0 PEER`` with PEER one of sae-lens
(6.54.12 here), eai-sparsify (1.3.3), llamascopium (2.0.0b34; it needs "transformer-lens<4" too, as it
imports HookedTransformer).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
HOOKS = [
    "blocks.0.hook_resid_post",
    "blocks.1.mlp.hook_in",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_resid_post",
    "blocks.0.mlp.hook_in",
    "blocks.0.hook_mlp_out",
]
CONTEXTS, T = 2, 24


def activations(model_dir: Path) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import save_file

    from saelake.lake import documents, load_model, pack_contexts

    lm = load_model(str(model_dir))
    ctxs = pack_contexts(documents(str(REPO / "tests" / "data" / "corpus.txt")), lm.tokenizer, T, lm.bos_token_id)
    tokens = torch.stack([torch.from_numpy(next(ctxs).tokens).long() for _ in range(CONTEXTS)])
    acts = lm.activations(tokens, HOOKS)
    out = {"tokens": tokens} | {h: a.float().contiguous() for h, a in acts.items()}
    save_file(out, str(HERE / "activations.safetensors"))


def saelake_exports(model_dir: Path, tmp: Path) -> None:
    """SAEs saved by saelake (random weights, each kind SAELens reads) exported to SAELens folders:
    peer_saelens.py loads them with SAELens and records its forward."""
    import shutil

    import torch

    from saelake.train import dictionaries
    from saelake.train.interop import export_saelens
    from saelake.train.store import SAEStore

    out = HERE / "saelake_exports"
    shutil.rmtree(out, ignore_errors=True)
    gen = torch.Generator().manual_seed(1)
    for arch, hooks, k in (
        ("topk", (HOOKS[0], HOOKS[0]), 8),
        ("jumprelu", (HOOKS[0], HOOKS[0]), None),
        ("relu", (HOOKS[1], HOOKS[2]), None),
    ):
        sae = dictionaries.get(arch).build(32, 64, k=k)
        sae.initialize([gen], dec_norm=1.0)
        with torch.no_grad():
            sae.b_enc.normal_(-0.05, 0.02, generator=gen)
            sae.b_dec.normal_(0, 0.05, generator=gen)
        state = sae.member_state(0)
        if "threshold" in state:
            state["threshold"] = torch.rand(64, generator=gen) * 0.05
        name = f"{arch}-{'transcoder' if hooks[0] != hooks[1] else 'sae'}"
        cfg = {
            "name": name,
            "arch": arch,
            "hook": hooks[0],
            "out_hook": hooks[1],
            "hooks": [hooks[0]],
            "out_hooks": [hooks[1]],
            "d_in": 32,
            "d_sae": 64,
            "d_out": 32,
            "k": k,
            "model": "tiny-gpt2",
            "status": "complete",
            "apply_b_dec_to_input": hooks[0] == hooks[1],
            "hyperparameters": {"k": k},
        }
        SAEStore(str(tmp / "lake")).save(cfg, state, register=False)
        export_saelens(str(tmp / "lake"), name, out / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for peer in ("saelens", "sparsify", "llamascopium"):
        p.add_argument(f"--{peer}", help=f"python of the venv with {peer} installed (skip the peer if not given)")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.conftest import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "tiny-gpt2")
        os.environ.setdefault("SAELAKE_HOME", str(Path(tmp) / "home"))
        activations(model_dir)
        if args.saelens:
            saelake_exports(model_dir, Path(tmp))
        for peer in ("saelens", "sparsify", "llamascopium"):
            python = getattr(args, peer)
            if python:
                print(f"{peer}: {python}", flush=True)
                subprocess.run(
                    [python, str(HERE / f"peer_{peer}.py"), str(HERE), str(model_dir)],
                    check=True,
                    env={**os.environ, "PYTHONPATH": ""},
                )


if __name__ == "__main__":
    main()
