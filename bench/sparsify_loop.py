"""sparsify's training step on rows given in order (run by bench/vs_sparsify.py under eai-sparsify's venv).

It imports nothing from saelake. The model, its forward and loss (FVU, optional AuxK), the decoder
renormalisation before each step, and the removal of the decoder gradient's component parallel to
the decoder rows are sparsify's own (``SparseCoder``). This file repeats only the outer loop of
``sparsify.Trainer.fit`` for the ``fvu`` loss on one hookpoint: the decoder bias set to the first
batch's mean, torch's Adam, and the dead-latent counters. ``Trainer`` reads activations by running a
model, so the rows cannot be fed to it as they are.

    python bench/sparsify_loop.py --rows rows.npy --order order.npy --batch-size 4096 --d-sae 4608 --k 32 \
        --lr 3.77e-4 --out DIR [--init init.safetensors] [--auxk-alpha 0] [--schedule constant|linear] \\
        [--no-grad-projection]

Writes DIR/sae.safetensors (sparsify's own save_to_disk: sae.safetensors + cfg.json) and DIR/trace.json
(per logged step: fvu, auxk, dead fraction, decoder row norms before renormalisation, seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from sparsify import SparseCoder, SparseCoderConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", required=True, help="[N, d] float32 .npy: every training row")
    p.add_argument("--order", required=True, help="[steps * batch] int .npy: the row of each stream position")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument(
        "--schedule", default="constant", choices=["constant", "linear"], help="linear: sparsify's decay to 0"
    )
    p.add_argument("--auxk-alpha", type=float, default=0.0, help="sparsify's default: 0 (no AuxK)")
    p.add_argument("--dead-threshold", type=int, default=10_000_000, help="tokens (sparsify's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start from these weights (sparsify's names and orientation)")
    p.add_argument("--no-grad-projection", action="store_true", help="keep the decoder gradient along the rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    rows = torch.from_numpy(np.load(a.rows))
    order = torch.from_numpy(np.load(a.order).astype(np.int64))
    steps = len(order) // a.batch_size
    torch.manual_seed(a.seed)  # as sparsify.Trainer, before building each SAE
    sae = SparseCoder(rows.shape[1], SparseCoderConfig(num_latents=a.d_sae, k=a.k), "cpu", dtype=torch.float32)
    if a.init:
        sae.load_state_dict(load_file(a.init))
    opt = torch.optim.Adam(sae.parameters(), lr=a.lr)
    since_fired = torch.zeros(a.d_sae, dtype=torch.long)
    trace, t0 = [], time.perf_counter()
    for step in range(steps):
        x = rows[order[step * a.batch_size : (step + 1) * a.batch_size]]
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > a.dead_threshold if a.auxk_alpha > 0 else None
        out = sae(x, dead_mask=dead)
        (out.fvu + a.auxk_alpha * out.auxk_loss).backward()
        if not a.no_grad_projection:
            sae.remove_gradient_parallel_to_decoder_directions()
        if a.schedule == "linear":
            for g in opt.param_groups:
                g["lr"] = a.lr * (1 - step / steps)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired += len(x)
            since_fired[out.latent_indices.flatten()] = 0
        if step % a.log_every == 0 or step == steps - 1:
            norms = sae.W_dec.detach().norm(dim=1)
            trace.append(
                {
                    "step": step,
                    "fvu": float(out.fvu.detach()),
                    "auxk": float(out.auxk_loss.detach()),
                    "dead_fraction": float((since_fired > a.dead_threshold).float().mean()),
                    "dead_fraction_1m": float((since_fired >= 1_000_000).float().mean()),
                    "dec_norm_mean": float(norms.mean()),
                    "dec_norm_max_dev": float((norms - 1).abs().max()),
                    "enc_norm_mean": float(sae.encoder.weight.detach().norm(dim=1).mean()),
                    "seconds": time.perf_counter() - t0,
                }
            )
    sae.save_to_disk(a.out)
    Path(a.out, "trace.json").write_text(
        json.dumps({"steps": steps, "seconds": time.perf_counter() - t0, "trace": trace})
    )


if __name__ == "__main__":
    main()
