"""Analyze an SAE live: the model runs over the corpus and feeds the analysis (no cache).

    python examples/analyze_sae.py --lake ./lake-demo [--sae NAME]

Without --sae (or when it does not exist yet) a small TopK SAE is first trained live on
--train-tokens. Under a minute at the defaults on the bundled SmolLM2-135M (2 CPU cores). Tiny:
--model DIR --dataset FILE --hook blocks.0.hook_resid_post --context-size 32 --tokens 640
--train-tokens 2048 --train-batch-size 256 --expansion 2 --k 4.
"""

import argparse
import time

from saelake.analyze import AnalyzeConfig, EmbeddedStore, analyze, show_feature
from saelake.lake import Lake

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dataset", default="builtin")
p.add_argument("--hook", default="blocks.3.hook_resid_post")
p.add_argument("--sae", default=None, help="an SAE in the lake (default: train one live)")
p.add_argument("--tokens", type=int, default=8192, help="tokens to analyze")
p.add_argument("--context-size", type=int, default=128)
p.add_argument("--train-tokens", type=int, default=8192)
p.add_argument("--train-batch-size", type=int, default=1024)
p.add_argument("--expansion", type=float, default=4)
p.add_argument("--k", type=int, default=32)
p.add_argument("--name", default=None, help="analysis name")
args = p.parse_args()

lake = Lake(args.lake)
sae = args.sae or f"topk-live-{time.strftime('%Y%m%d-%H%M%S')}"
from saelake.train.store import SAEStore  # noqa: E402

if not SAEStore(lake).exists(sae):
    from saelake.train import SAEConfig, train

    cfg = train(
        args.lake,
        [SAEConfig(hooks=[args.hook], arch="topk", name=sae, expansion=args.expansion, k=args.k)],
        live=True,
        model=args.model,
        dataset=args.dataset,
        context_size=args.context_size,
        tokens=args.train_tokens,
        batch_size=args.train_batch_size,
        progress=False,
    )[0]
    print(f"trained sae {sae}: d_sae {cfg['d_sae']}, FVU {cfg['fvu']:.3f}, L0 {cfg['l0']:.1f}")
rec = analyze(
    AnalyzeConfig(
        lake=args.lake,
        sae=sae,
        live=True,
        model=args.model,
        dataset=args.dataset,
        context_size=args.context_size,
        tokens=args.tokens,
        name=args.name or f"{sae}-live",
        overwrite=True,
    ),
    progress=False,
)
print(
    f"analysis {rec.name}: {rec.n_features} features over {rec.tokens} valid live tokens "
    f"({rec.tokens_per_second:.0f} tok/s including the model)"
)
store = EmbeddedStore(lake)
rows = sorted(store.scalars(rec.name), key=lambda r: -r["density"])
alive = sum(r["count"] > 0 for r in rows)
print(
    f"{alive} of {len(rows)} features fired; densest: "
    + ", ".join(f"{r['feature']} ({r['density']:.2%})" for r in rows[:5])
)
pick = next((r for r in rows if 0 < r["density"] < 0.05), rows[0])  # a sparse, interpretable-looking one
show_feature(rec, store.feature(rec.name, pick["feature"]), n_top=5)
print(f"next: lake feature --lake {args.lake} {sae} INDEX --analysis {rec.name}")
