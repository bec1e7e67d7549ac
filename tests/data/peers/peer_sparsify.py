"""Run inside a venv with eai-sparsify: sparsify's own SparseCoder writes an SAE (hookpoint ``h.0``)
and a transcoder (``h.1.mlp``) and computes its forward on the activations its trainer would hook.

    python peer_sparsify.py OUT_DIR MODEL_DIR      (called by make_fixtures.py)

The activations come from the tiny model run through transformers with forward hooks on
``model.base_model.get_submodule(hookpoint)`` (outputs; a transcoder's inputs too), as sparsify's
trainer hooks them: saved in hook_activations.safetensors so the tests can check that saelake's
TransformerLens hooks see the same vectors.
"""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig
from transformers import AutoModelForCausalLM

root, model_dir = Path(sys.argv[1]), sys.argv[2]
out = root / "sparsify"
tokens = load_file(str(root / "activations.safetensors"))["tokens"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
gen = torch.Generator().manual_seed(0)
POINTS = {"h.0": False, "h.1.mlp": True}  # hookpoint -> transcode

seen = {}


def hook(name, transcode):
    def fn(module, inputs, outputs):
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        outputs = outputs[0] if isinstance(outputs, tuple) else outputs
        seen[name] = (
            inputs.flatten(0, 1).detach().clone() if transcode else None,
            outputs.flatten(0, 1).detach().clone(),
        )

    return fn


handles = [model.base_model.get_submodule(p).register_forward_hook(hook(p, t)) for p, t in POINTS.items()]
with torch.no_grad():
    model(tokens)
for h in handles:
    h.remove()
save_file(
    {f"{p}.{io}": t.contiguous() for p, (i, o) in seen.items() for io, t in (("in", i), ("out", o)) if t is not None},
    str(out.parent / "sparsify_hook_activations.safetensors"),
)

shutil.rmtree(out, ignore_errors=True)
for point, transcode in POINTS.items():
    x, y = seen[point]
    x = y if x is None else x
    sae = SparseCoder(x.shape[-1], SparseCoderConfig(k=8, num_latents=64, transcode=transcode))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.randn(sae.encoder.weight.shape, generator=gen) / x.shape[-1] ** 0.5)
        sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=gen) / 8)
        sae.encoder.bias.copy_(torch.randn(64, generator=gen) * 0.1 * x.std())
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=gen) * 0.05 * x.std())
    sae.save_to_disk(out / point)
    loaded = SparseCoder.load_from_disk(out / point)
    with torch.no_grad():
        fwd = loaded(x, y)
    latents = torch.zeros(x.shape[0], 64).scatter_(1, fwd.latent_indices, fwd.latent_acts.float())
    save_file(
        {"latents": latents.contiguous(), "output": fwd.sae_out.float().contiguous()},
        str(out / point / "peer_reference.safetensors"),
    )
    print(point, "L0", float((latents > 0).float().sum(-1).mean()))
