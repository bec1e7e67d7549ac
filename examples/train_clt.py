"""Train a cross-layer transcoder: one snapshot of every layer's MLP input and output, one CLT.

    python examples/train_clt.py --lake ./lake-demo

Layers 0-5 of the bundled SmolLM2-135M by default: an ingest of 20k tokens (skipped when the run
exists) holding blocks.{0-5}.ln2.hook_out (what each MLP reads) and blocks.{0-5}.hook_mlp_out (what it
writes), then a CLT with the top k latents of each layer per token; prints the held-out FVU per output
layer. For a tiny run: --model DIR --dataset FILE --layers 0-1 --ingest-tokens 2000 --tokens 2048
--batch-size 256 --context-size 32 --expansion 2 --k 4."""

import argparse
import time

from saelake import lake
from saelake.lake.hooknames import expand_hooks
from saelake.train import SAEConfig, train

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dataset", default="builtin")
p.add_argument("--layers", default="0-5", help="a-b: the layers the CLT covers")
p.add_argument("--run", default=None, help="snapshot run (default: clt-L<a>-<b>)")
p.add_argument("--ingest-tokens", type=int, default=20_000)
p.add_argument("--tokens", type=int, default=60_000)
p.add_argument("--batch-size", type=int, default=1024)
p.add_argument("--context-size", type=int, default=128)
p.add_argument("--expansion", type=float, default=4, help="latents per layer = expansion x d_model")
p.add_argument("--k", type=int, default=16, help="active latents per layer per token")
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--name", default=None)
args = p.parse_args()

ins, outs = (expand_hooks([f"blocks.{{{args.layers}}}.{h}"]) for h in ("ln2.hook_out", "hook_mlp_out"))
run = args.run or f"clt-L{args.layers}"
if run not in lake.Lake(args.lake).run_names():  # one ingest, one forward pass, every hook
    lake.ingest(
        lake.IngestConfig(
            lake=args.lake,
            model=args.model,
            dataset=args.dataset,
            hooks=ins + outs,
            tokens=args.ingest_tokens,
            context_size=args.context_size,
            run=run,
        )
    )
name = args.name or f"clt-{time.strftime('%Y%m%d-%H%M%S')}"
sae = SAEConfig(hooks=ins, out_hooks=outs, arch="clt", name=name, k=args.k, expansion=args.expansion, lr=args.lr)
cfg = train(args.lake, [sae], run=run, tokens=args.tokens, batch_size=args.batch_size, repeat=True)[0]
per_layer = cfg["holdout"].get("fvu_per_hook") or cfg["final_metrics"]["fvu_per_hook"]
print(
    f"sae {name}: clt over {len(ins)} layers, {cfg['d_sae']} latents ({cfg['d_sae'] // len(ins)} per layer, k "
    f"{args.k} each), {cfg['tokens_trained']} tokens, FVU {cfg['heldout_fvu'] or cfg['fvu']:.3f}, "
    f"{cfg['tokens_per_second']:.0f} tok/s"
)
for h, v in per_layer.items():
    print(f"  FVU {h}: {v:.3f}")
print(
    f"next: lake eval --lake {args.lake} {name}  (every MLP output replaced: CE loss recovered, KL);  "
    f"lake analyze --lake {args.lake} {name}"
)
