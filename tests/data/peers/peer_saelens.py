"""Run inside a venv with sae-lens: SAELens' own classes write SAE folders (every architecture saelake
reads, each normalize_activations mode) and their own forward on the tiny model's activations.

    python peer_saelens.py OUT_DIR MODEL_DIR      (called by make_fixtures.py)

Each case folder holds what SAELens wrote (cfg.json, sae_weights.safetensors, activation_scaler.json
...) plus peer_reference.safetensors: SAELens' latents and output on the activations at the case's
input hook (the raw activations: normalisation and its inverse applied as SAELens' trainer does).
"""

import shutil
import sys
from pathlib import Path

import torch
from sae_lens import SAE
from sae_lens.saes import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.activation_scaler import ActivationScaler, ActivationWhitening
from safetensors.torch import load_file, save_file

out, _model = Path(sys.argv[1]) / "saelens", sys.argv[2]
acts = load_file(str(Path(sys.argv[1]) / "activations.safetensors"))
H0, MLP_IN, MLP_OUT = "blocks.0.hook_resid_post", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
D, S = 32, 64
gen = torch.Generator().manual_seed(0)


def rows(hook):
    return acts[hook].reshape(-1, acts[hook].shape[-1])


def randomize(sae, x, active=0.3):
    """Weights with some structure: random directions, encoder bias so ~active of the latents fire."""
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[0] ** 0.5)
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=gen) * 0.05 * x.std())
        pre = x @ sae.W_enc
        sae.b_enc.copy_(-pre.quantile(1 - active, dim=0) + torch.randn(S, generator=gen) * 0.01 * pre.std())
        if hasattr(sae, "threshold"):
            sae.threshold.copy_((pre.std(0) * 0.3).abs())


def save(name, sae, x, scaler=None, extra=()):
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    sae.save_model(folder)
    for f in extra:
        f(folder)
    z = scaler.scale(x) if scaler else x
    with torch.no_grad():
        latents = sae.encode(z)
        y = sae.decode(latents)
    if scaler:
        y = scaler.unscale(y)
    save_file({"latents": latents.contiguous(), "output": y.contiguous()}, str(folder / "peer_reference.safetensors"))
    print(name, "L0", float((latents > 0).float().sum(-1).mean()))


def meta(hook=H0, **kw):
    return SAEMetadata(hook_name=hook, model_name="tiny-gpt2", **kw)


x0 = rows(H0)
x_in = rows(MLP_IN)
for name, cls, cfg_cls, kw in (
    ("standard", StandardSAE, StandardSAEConfig, {}),
    ("jumprelu", JumpReLUSAE, JumpReLUSAEConfig, {}),
    ("topk", TopKSAE, TopKSAEConfig, {"k": 8}),
    ("topk_rescaled", TopKSAE, TopKSAEConfig, {"k": 8, "rescale_acts_by_decoder_norm": True}),
):
    sae = cls(cfg_cls(d_in=D, d_sae=S, metadata=meta(), **kw))
    randomize(sae, x0)
    save(name, sae, x0)

for name, cls, cfg_cls in (
    ("transcoder", Transcoder, TranscoderConfig),
    ("jumprelu_transcoder", JumpReLUTranscoder, JumpReLUTranscoderConfig),
):
    sae = cls(
        cfg_cls(d_in=D, d_sae=S, d_out=D, apply_b_dec_to_input=False, metadata=meta(MLP_IN, hook_name_out=MLP_OUT))
    )
    randomize(sae, x_in)
    save(name, sae, x_in)

# BatchTopK as SAELens saves it for inference: a JumpReLU with the learned global threshold
sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=S, k=8, metadata=meta()))
randomize(sae, x0)
with torch.no_grad():
    sae.topk_threshold.fill_(float((x0 @ sae.W_enc + sae.b_enc).quantile(0.8)))
folder = out / "batchtopk"
shutil.rmtree(folder, ignore_errors=True)
sae.save_inference_model(folder)
inference = SAE.load_from_disk(folder)
save("batchtopk", inference, x0)

# expected_average_only_in: trained on x * s, s kept in activation_scaler.json (a training checkpoint)
scaler = ActivationScaler(scaling_factor=float(D**0.5 / x0.norm(dim=-1).mean()))
sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=S, normalize_activations="expected_average_only_in", metadata=meta()))
randomize(sae, scaler.scale(x0))
save("expected_average_only_in", sae, x0, scaler, [lambda f: scaler.save(str(f / "activation_scaler.json"))])

# covariance_whitening: trained on (x - mean) @ M, outputs mapped back with M^-1
mean = x0.mean(0)
cov = torch.cov((x0 - mean).T.double()) + 1e-3 * torch.eye(D, dtype=torch.double)
evals, evecs = torch.linalg.eigh(cov)
M = (evecs / evals.sqrt()).float()
whiten = ActivationScaler(
    whitening=ActivationWhitening(mean=mean, matrix=M.contiguous(), inverse_matrix=torch.linalg.inv(M).contiguous())
)
sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=S, k=8, normalize_activations="covariance_whitening", metadata=meta()))
randomize(sae, whiten.scale(x0))
save("covariance_whitening", sae, x0, whiten, [lambda f: whiten.save(str(f / "activation_scaler.json"))])

# per-token norms: SAELens scales each token at run time (saelake refuses these)
for norm in ("constant_norm_rescale", "layer_norm"):
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=S, normalize_activations=norm, metadata=meta()))
    randomize(sae, x0)
    save(norm, sae, x0)

# the other way: SAELens loads folders saelake exported (made by make_fixtures.py)
for folder in sorted((Path(sys.argv[1]) / "saelake_exports").iterdir()):
    sae = SAE.load_from_disk(folder)
    x = rows(sae.cfg.metadata.hook_name)
    with torch.no_grad():
        latents = sae.encode(x)
        y = sae.decode(latents)
    save_file({"latents": latents.contiguous(), "output": y.contiguous()}, str(folder / "peer_reference.safetensors"))
    print("saelens loads saelake's", folder.name, type(sae).__name__)
