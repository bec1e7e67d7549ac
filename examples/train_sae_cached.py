"""Train a TopK SAE from cached activations: ingest a 1d snapshot once, then train on it.

    python examples/train_sae_cached.py --lake ./lake-demo

About a minute at the defaults on the bundled SmolLM2-135M: ingest 20k tokens (skipped when the
run exists), then 120k training tokens read from the snapshot (looping over it with --repeat).
"""

import argparse
import time

from saelake import lake
from saelake.train import SAEConfig, train

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dataset", default="builtin")
p.add_argument("--hook", default="blocks.5.hook_resid_post")
p.add_argument("--run", default="cached")
p.add_argument("--ingest-tokens", type=int, default=20_000)
p.add_argument("--tokens", type=int, default=120_000)
p.add_argument("--batch-size", type=int, default=1024)
p.add_argument("--context-size", type=int, default=128)
p.add_argument("--expansion", type=float, default=4)
p.add_argument("--k", type=int, default=16)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--name", default=None)
args = p.parse_args()

if args.run not in lake.Lake(args.lake).run_names():
    lake.ingest(
        lake.IngestConfig(
            lake=args.lake,
            model=args.model,
            dataset=args.dataset,
            hooks=[args.hook],
            tokens=args.ingest_tokens,
            context_size=args.context_size,
            layouts=["1d", "2d"],
            run=args.run,
        )
    )
source = lake.SnapshotSource(args.lake, args.run)
name = args.name or f"topk-cached-{time.strftime('%Y%m%d-%H%M%S')}"
sae = SAEConfig(hooks=[args.hook], arch="topk", name=name, k=args.k, expansion=args.expansion, lr=args.lr)
cfg = train(args.lake, [sae], run=args.run, tokens=args.tokens, batch_size=args.batch_size, repeat=True)[0]
print(
    f"sae {name}: topk k {args.k}, d_sae {cfg['d_sae']}, trained on snapshot {args.run} v{cfg['version']} "
    f"({source.n_tokens} tokens, {cfg['tokens_trained']} read), FVU {cfg['fvu']:.3f}, L0 {cfg['l0']:.1f}, "
    f"{cfg['tokens_per_second']:.0f} tok/s"
)
print(f"next: lake eval --lake {args.lake} {name};  lake plot --lake {args.lake} {name} -o curves.png")
