"""Train Lorsa (low-rank sparse attention) on one attention layer, over whole contexts (the 2d table).

    python examples/train_lorsa.py --lake ./lake-demo

Layer 3 of the bundled SmolLM2-135M by default: an ingest of 20k tokens in contexts (skipped when the
run exists) holding the layer's attention input (ln1.hook_normalized) and output (hook_attn_out), then a
Lorsa with --heads rank-1 heads sharing --qk-heads QK groups, the model's RoPE read from its config;
prints the held-out FVU and where one active head attends on a context. For a tiny run: --model DIR
--dataset FILE --layer 0 --ingest-tokens 2000 --tokens 4096 --batch-size 256 --context-size 32 --heads 64
--qk-heads 4 --k 4."""

import argparse
import time

from saelake import lake
from saelake.train import SAEConfig, load_sae, train

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dataset", default="builtin")
p.add_argument("--layer", type=int, default=3)
p.add_argument("--run", default=None, help="snapshot run (default: lorsa-L<layer>)")
p.add_argument("--ingest-tokens", type=int, default=20_000)
p.add_argument("--tokens", type=int, default=60_000)
p.add_argument("--batch-size", type=int, default=1024, help="tokens per step (whole contexts)")
p.add_argument("--context-size", type=int, default=128)
p.add_argument("--heads", type=int, default=2304)
p.add_argument("--qk-heads", type=int, default=36)
p.add_argument("--k", type=int, default=32, help="active heads per position")
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--name", default=None)
args = p.parse_args()

hook, out = f"blocks.{args.layer}.ln1.hook_normalized", f"blocks.{args.layer}.hook_attn_out"
run = args.run or f"lorsa-L{args.layer}"
if run not in lake.Lake(args.lake).run_names():
    lake.ingest(
        lake.IngestConfig(
            lake=args.lake,
            model=args.model,
            dataset=args.dataset,
            hooks=[hook, out],
            tokens=args.ingest_tokens,
            context_size=args.context_size,
            layouts=["2d"],
            run=run,
        )
    )
name = args.name or f"lorsa-{time.strftime('%Y%m%d-%H%M%S')}"
sae = SAEConfig(
    hooks=[hook],
    out_hooks=[out],
    arch="lorsa",
    name=name,
    heads=args.heads,
    qk_heads=args.qk_heads,
    k=args.k,
    lr=args.lr,
)
cfg = train(args.lake, [sae], run=run, tokens=args.tokens, batch_size=args.batch_size, repeat=True)[0]
hp = cfg["hyperparameters"]
print(
    f"sae {name}: lorsa, {hp['heads']} heads over {hp['qk_heads']} QK groups of {hp['d_qk']} dims (RoPE base "
    f"{hp['rotary_base']:g}), k {hp['k']}, {cfg['tokens_trained']} tokens, "
    f"FVU {cfg['heldout_fvu'] or cfg['fvu']:.3f}"
)
lorsa, _ = load_sae(args.lake, name)
ctx = next(lake.SnapshotSource(args.lake, run).context_batches(1, [hook]))
x = ctx.acts[hook][0].float()
f = lorsa.encode(x).dense()[0]  # [T, heads]
i = int(f[1:].argmax())  # the strongest head activation after BOS
t, h = 1 + i // f.shape[1], i % f.shape[1]
pattern = lorsa.attention(x, h)[t]
src = pattern.topk(3)
print(
    f"head {h} at position {t} ({f[t, h]:.2f}) attends to positions {src.indices.tolist()} "
    f"(weights {[round(v, 2) for v in src.values.tolist()]})"
)
print(f"next: lake analyze --lake {args.lake} {name};  lake eval --lake {args.lake} {name}")
