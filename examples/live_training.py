"""Shared body of the live-training examples (train_sae_topk.py, train_sae_batchtopk.py,
train_sae_jumprelu.py): the model runs over the corpus and feeds the trainer, no cache."""

import argparse
import time

from saelake.train import SAEConfig, train


def main(arch: str, description: str) -> None:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--lake", default="./lake-demo")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="builtin")
    p.add_argument("--hook", default="blocks.5.hook_resid_post")
    p.add_argument("--tokens", type=int, default=40_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--expansion", type=float, default=4)
    p.add_argument("--k", type=int, default=32, help="TopK/BatchTopK: active latents per token")
    p.add_argument("--l1", type=float, default=None, help="JumpReLU L0 coefficient")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--name", default=None)
    args = p.parse_args()

    name = args.name or f"{arch}-live-{time.strftime('%Y%m%d-%H%M%S')}"
    sparsity = {"l1": args.l1} if arch == "jumprelu" else {"k": args.k}
    sae = SAEConfig(hooks=[args.hook], arch=arch, name=name, expansion=args.expansion, lr=args.lr, **sparsity)
    cfg = train(
        args.lake,
        [sae],
        live=True,
        model=args.model,
        dataset=args.dataset,
        context_size=args.context_size,
        tokens=args.tokens,
        batch_size=args.batch_size,
    )[0]
    print(
        f"sae {name}: {arch}, d_sae {cfg['d_sae']}, {cfg['tokens_trained']} live tokens, FVU {cfg['fvu']:.3f}, "
        f"L0 {cfg['l0']:.1f}, dead {cfg['dead_fraction']:.3f} ({cfg['tokens_per_second']:.0f} tok/s incl. the model)"
    )
    print(f"next: lake show --lake {args.lake} {name};  lake eval --lake {args.lake} {name}")
