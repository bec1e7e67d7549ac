"""Analyze an SAE from cached 2d activations (a snapshot); into MongoDB when MONGO_URI is set.

    python examples/analyze_sae_cached.py --lake ./lake-demo [--sae NAME]
    MONGO_URI=mongodb://127.0.0.1:27017/saelake python examples/analyze_sae_cached.py ...

Ingests a 1d + 2d snapshot once (skipped when the run exists), trains a small TopK SAE on its
1d table when --sae is absent, then analyzes it over the 2d table. Under a minute at the
defaults on the bundled SmolLM2-135M. Tiny: --model DIR --dataset FILE --hook
blocks.0.hook_resid_post --context-size 32 --ingest-tokens 1024 --train-tokens 2048
--train-batch-size 256 --expansion 2 --k 4.
"""

import argparse
import os
import time

from saelake import lake
from saelake.analyze import AnalyzeConfig, analyze, open_store

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dataset", default="builtin")
p.add_argument("--hook", default="blocks.3.hook_resid_post")
p.add_argument("--run", default="cached-2d")
p.add_argument("--ingest-tokens", type=int, default=10240)
p.add_argument("--context-size", type=int, default=128)
p.add_argument("--sae", default=None, help="an SAE in the lake (default: train one on the snapshot)")
p.add_argument("--train-tokens", type=int, default=20480)
p.add_argument("--train-batch-size", type=int, default=1024)
p.add_argument("--expansion", type=float, default=4)
p.add_argument("--k", type=int, default=32)
p.add_argument("--store", default=os.environ.get("MONGO_URI"), help="mongodb://HOST:PORT/DB (env MONGO_URI)")
p.add_argument("--name", default=None, help="analysis name")
args = p.parse_args()

L = lake.Lake(args.lake)
if args.run not in L.run_names():
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
        ),
        progress=False,
    )
sae = args.sae or f"topk-{args.run}-{time.strftime('%Y%m%d-%H%M%S')}"
from saelake.train.store import SAEStore  # noqa: E402

if not SAEStore(L).exists(sae):
    from saelake.train import SAEConfig, train

    cfg = train(
        args.lake,
        [SAEConfig(hooks=[args.hook], arch="topk", name=sae, expansion=args.expansion, k=args.k)],
        run=args.run,
        tokens=args.train_tokens,
        batch_size=args.train_batch_size,
        repeat=True,
        progress=False,
    )[0]
    print(f"trained sae {sae} on snapshot {args.run}: d_sae {cfg['d_sae']}, FVU {cfg['fvu']:.3f}, L0 {cfg['l0']:.1f}")
rec = analyze(
    AnalyzeConfig(lake=args.lake, sae=sae, run=args.run, store=args.store, name=args.name, overwrite=True),
    progress=False,
)
print(
    f"analysis {rec.name} -> {rec.store}: {rec.n_features} features over {rec.tokens} valid tokens "
    f"of snapshot {rec.run} v{rec.version} ({rec.tokens_per_second:.0f} tok/s)"
)
store = open_store(L, args.store)
rows = sorted(store.scalars(rec.name), key=lambda r: -r["density"])
for r in rows[:5]:
    f = store.feature(rec.name, r["feature"])
    top = f["samples"][0] if f["samples"] else None
    peak = ""
    if top and top["positions"]:
        i = top["positions"][top["acts"].index(max(top["acts"]))]
        peak = f", peaks on {top['strs'][i]!r} in context {top['context_id']}"
    print(
        f"  feature {r['feature']:5d}: density {r['density']:.2%}, max {r['max_act']:.3g}{peak}, "
        f"promotes {f['pos_strs'][:3]}"
    )
where = f"--store {args.store} " if args.store else f"--lake {args.lake} "
print(
    f"next: lake feature {where}{sae} {rows[0]['feature']}"
    + ("" if args.store else f';  lake query --lake {args.lake} "select name, tokens from analyses"')
)
