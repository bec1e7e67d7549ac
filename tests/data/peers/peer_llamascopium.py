"""Run inside a venv with llamascopium (and transformer-lens < 4, which it imports): Llamascopium's own
SparseAutoEncoder writes SAEs and a transcoder (dataset-wise activation norms, with and without
decoder norms in the sparsity, one folded to "inference") and computes its forward on the raw
activations: normalize_activations -> encode -> decode -> denormalize, as its evaluator does.

    python peer_llamascopium.py OUT_DIR MODEL_DIR      (called by make_fixtures.py)

peer_reference.safetensors: ``latents`` (in its normalised space), ``output`` (denormalised) and,
from the same folder loaded with ``fold_activation_scale=True``, ``latents_folded`` and
``output_folded`` (Llamascopium's own folding).
"""

import shutil
import sys
from pathlib import Path

import torch
from llamascopium.models.sae import SAEConfig, SparseAutoEncoder
from safetensors.torch import load_file, save_file

root = Path(sys.argv[1])
out = root / "llamascopium"
acts = load_file(str(root / "activations.safetensors"))
H0, MLP_IN, MLP_OUT = "blocks.0.hook_resid_post", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
gen = torch.Generator().manual_seed(0)


def rows(hook):
    return acts[hook].reshape(-1, acts[hook].shape[-1])


def make(name, hook_in, hook_out, act_fn, with_norm=True, norm="dataset-wise", fold=False):
    cfg = SAEConfig(
        hook_point_in=hook_in,
        hook_point_out=hook_out,
        d_model=32,
        expansion_factor=2,
        act_fn=act_fn,
        top_k=8,
        norm_activation=norm,
        sparsity_include_decoder_norm=with_norm,
    )
    sae = SparseAutoEncoder(cfg)
    x, y = rows(hook_in), rows(hook_out)
    norms = {hook_in: float(x.norm(dim=-1).mean()), hook_out: float(y.norm(dim=-1).mean())}
    sae.set_dataset_average_activation_norm(norms)
    with torch.no_grad():
        sae.W_E.copy_(torch.randn(sae.W_E.shape, generator=gen) / 32**0.5)
        sae.W_D.copy_(torch.randn(sae.W_D.shape, generator=gen) / 8 * (0.5 + torch.rand(64, 1, generator=gen)))
        sae.b_D.copy_(torch.randn(32, generator=gen) * 0.1)
        pre = sae.normalize_activations({hook_in: x})[hook_in] @ sae.W_E
        sae.b_E.copy_(-pre.quantile(0.7, dim=0))
        if act_fn == "jumprelu":
            sae.activation_function.log_jumprelu_threshold.copy_((pre.std(0) * 0.3).log())
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sae.save_pretrained(folder, fold_activation_scale=fold)
    sae.cfg.save_hyperparameters(folder)
    loaded = SparseAutoEncoder.from_pretrained(str(folder))
    ref = {}
    with torch.no_grad():
        if loaded.cfg.norm_activation == "dataset-wise":
            batch, scales = loaded.normalize_activations({hook_in: x, hook_out: y}, return_scale_factor=True)
            latents = loaded.encode(batch[hook_in])
            output = loaded.denormalize_activations({hook_out: loaded.decode(latents)}, {hook_out: scales[hook_out]})
            ref |= {"latents": latents, "output": output[hook_out]}
            folded = SparseAutoEncoder.from_pretrained(str(folder), fold_activation_scale=True)
        else:
            folded = loaded
        latents = folded.encode(x)
        ref |= {"latents_folded": latents, "output_folded": folded.decode(latents)}
    save_file({k: v.float().contiguous() for k, v in ref.items()}, str(folder / "peer_reference.safetensors"))
    print(name, "L0", {k: float((v > 0).float().sum(-1).mean()) for k, v in ref.items() if k.startswith("latents")})


shutil.rmtree(out, ignore_errors=True)
make("sae_topk", H0, H0, "topk")
make("sae_jumprelu", H0, H0, "jumprelu")
make("sae_relu", H0, H0, "relu", with_norm=False)
make("transcoder_jumprelu", MLP_IN, MLP_OUT, "jumprelu")
make("sae_topk_inference", H0, H0, "topk", fold=True)
make("sae_token_wise", H0, H0, "topk", norm="token-wise")


# a cross-layer transcoder over both layers' MLPs (JumpReLU, decoder norms in the sparsity)
from llamascopium.models.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402

ins, outs = ["blocks.0.mlp.hook_in", MLP_IN], ["blocks.0.hook_mlp_out", MLP_OUT]
clt = CrossLayerTranscoder(
    CLTConfig(
        hook_points_in=ins,
        hook_points_out=outs,
        d_model=32,
        expansion_factor=1,
        act_fn="jumprelu",
        norm_activation="dataset-wise",
    )
)
clt.set_dataset_average_activation_norm({h: float(rows(h).norm(dim=-1).mean()) for h in ins + outs})
with torch.no_grad():
    clt.W_E.copy_(torch.randn(clt.W_E.shape, generator=gen) / 32**0.5)
    for W in clt.W_D:
        W.copy_(torch.randn(W.shape, generator=gen) / 8)
    for b in clt.b_D:
        b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    batch = clt.normalize_activations({h: rows(h) for h in ins + outs})
    pre = torch.einsum("bld,lds->bls", clt.prepare_input(batch)[0], clt.W_E)
    clt.b_E.copy_(-pre.quantile(0.6, dim=0))
    clt.activation_function.log_jumprelu_threshold.copy_((pre.std(0) * 0.3).log())
folder = out / "clt_jumprelu"
folder.mkdir(parents=True)
clt.save_pretrained(folder)
clt.cfg.save_hyperparameters(folder)
loaded = CrossLayerTranscoder.from_pretrained(str(folder))
with torch.no_grad():
    batch, scales = loaded.normalize_activations({h: rows(h) for h in ins + outs}, return_scale_factor=True)
    latents = loaded.encode(loaded.prepare_input(batch)[0])  # [N, L, s]
    y = loaded.decode(latents, batch_first=True)  # [N, L, d]
    output = torch.stack([y[:, j] / scales[h] for j, h in enumerate(outs)], 1)
save_file({"latents": latents.contiguous(), "output": output.contiguous()}, str(folder / "peer_reference.safetensors"))
print("clt_jumprelu L0", float((latents > 0).float().sum((-1, -2)).mean()))
