"""GPU readiness, one shot: ingest a small snapshot, train a TopK SAE on the device with and without
bf16 autocast, and print tokens/s next to what the device can do, measured in the same run.

  matmul   the device's rate for the encoder's GEMM shape ([batch, d_in] x [d_in, d_sae]) in bf16
           (float32 on a CPU dry run), best of a few timed repeats
  train    tokens/s of `saelake.train.train` (TopK, k 32, expansion 8) on the snapshot, timed after
           the first steps (model building and the first batch excluded), fp32 and bf16 autocast
  bound    tokens/s if every step were only its dense encoder GEMM (2·d_in·d_sae FLOP per token) at
           the measured matmul rate; `fraction` = train / bound
  reader   tokens/s that SnapshotSource.token_batches delivers as float32 tensors moved to the device

    bash bench/gpu.sh                          # on a GPU machine (under 8 minutes on one GPU)
    bash bench/gpu.sh --device cpu --tiny      # the CPU dry run that `make test` runs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, b: int, d_in: int, d_sae: int, dtype) -> float:
    import torch

    x = torch.randn(b, d_in, device=device, dtype=dtype)
    w = torch.randn(d_in, d_sae, device=device, dtype=dtype)
    torch.mm(x, w)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(10):
            torch.mm(x, w)
        sync(device)
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * b * d_in * d_sae / best


def reader_rate(lake: str, run: str, hook: str, device: str, batch: int) -> float:
    from saelake.lake import SnapshotSource

    src = SnapshotSource(lake, run)
    n = 0
    t = time.perf_counter()
    for b in src.token_batches(batch, [hook], seed=0):
        n += b.acts[hook].to(device, non_blocking=True).float().shape[0]
    sync(device)
    return n / (time.perf_counter() - t)


def train_rate(
    lake: str, run: str, hook: str, device: str, tokens: int, batch: int, autocast: str | None, name: str
) -> tuple[float, dict]:
    """Tokens/s over the whole call minus a warm-up call of two steps (boot, first batch, allocations)."""
    from saelake.train import SAEConfig, train

    def once(n_tokens: int, tag: str) -> tuple[float, dict]:
        t = time.perf_counter()
        cfg = train(
            lake,
            [SAEConfig(hooks=[hook], arch="topk", k=32, expansion=8, name=f"{name}-{tag}")],
            run=run,
            tokens=n_tokens,
            batch_size=batch,
            repeat=True,
            device=device,
            autocast=autocast,
            progress=False,
        )[0]
        sync(device)
        return time.perf_counter() - t, cfg

    warm, _ = once(2 * batch, "warm")
    total, cfg = once(tokens, "run")
    return (tokens - 2 * batch) / max(total - warm, 1e-9), cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random model and corpus (the CPU dry run)")
    p.add_argument("--lake", default=None, help="default: a temporary directory")
    p.add_argument("--ingest-tokens", type=int, default=None)
    p.add_argument("--train-tokens", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    import torch

    from saelake.lake import IngestConfig, ingest

    tmp = tempfile.TemporaryDirectory()
    lake = a.lake or str(Path(tmp.name) / "lake")
    if a.tiny:
        import sys

        sys.path.insert(0, str(ROOT))  # the tests' tiny model builder
        from tests.conftest import make_tiny_model

        model, dataset, hook, ctx = (
            str(make_tiny_model(Path(tmp.name) / "tiny")),
            str(ROOT / "tests" / "data" / "corpus.txt"),
            "blocks.1.hook_resid_post",
            32,
        )
        ingest_tokens, train_tokens, batch = a.ingest_tokens or 4096, a.train_tokens or 8192, 512
    else:
        model, dataset, hook, ctx = "smollm2-135m", "builtin", "blocks.15.hook_resid_post", 128
        ingest_tokens, train_tokens, batch = a.ingest_tokens or 131_072, a.train_tokens or 4_096_000, 4096
    t = time.perf_counter()
    m = ingest(
        IngestConfig(
            lake=lake,
            model=model,
            dataset=dataset,
            hooks=[hook],
            tokens=ingest_tokens,
            context_size=ctx,
            layouts=["1d"],
            run="gpu",
            device=a.device,
        ),
        progress=False,
    )
    ingest_s = time.perf_counter() - t
    d_in = m.d_model[hook] if hasattr(m, "d_model") else m["d_model"][hook]
    d_sae = 8 * d_in
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    rate = matmul_rate(a.device, batch, d_in, d_sae, dtype)
    bound = rate / (2 * d_in * d_sae)
    out = {
        "device": a.device,
        "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "hook": hook,
        "d_in": d_in,
        "d_sae": d_sae,
        "batch": batch,
        "ingest_tokens": ingest_tokens,
        "ingest_tok_s": ingest_tokens / ingest_s,
        "matmul_flop_s": rate,
        "matmul_dtype": str(dtype),
        "bound_tok_s": bound,
        "reader_tok_s": reader_rate(lake, "gpu", hook, a.device, batch),
    }
    for autocast in (None, "bf16"):
        tok_s, cfg = train_rate(lake, "gpu", hook, a.device, train_tokens, batch, autocast, f"gpu-{autocast or 'fp32'}")
        key = autocast or "fp32"
        out[f"train_{key}_tok_s"] = tok_s
        out[f"train_{key}_fraction"] = tok_s / bound
        out[f"train_{key}_fvu"] = cfg.get("fvu")
    if a.json:
        print(json.dumps(out))
        return
    print(f"device {out['device_name']} ({a.device}); hook {hook}, d_in {d_in}, d_sae {d_sae}, batch {batch}")
    print(f"ingest   {out['ingest_tok_s']:>12,.0f} tok/s ({ingest_tokens:,} tokens)")
    print(f"matmul   {rate / 1e12:>12.2f} TFLOP/s ({dtype}, [{batch}, {d_in}] x [{d_in}, {d_sae}])")
    print(f"bound    {bound:>12,.0f} tok/s (dense encoder GEMM only)")
    print(f"reader   {out['reader_tok_s']:>12,.0f} tok/s (float32 on {a.device})")
    for key in ("fp32", "bf16"):
        print(
            f"train {key} {out[f'train_{key}_tok_s']:>10,.0f} tok/s = {out[f'train_{key}_fraction']:.2f} of the bound"
            + (f", held-out FVU {out[f'train_{key}_fvu']:.3f}" if out.get(f"train_{key}_fvu") is not None else "")
        )


if __name__ == "__main__":
    main()
