"""Generate 2d (per-context) activations: what analysis reads to show features in context.

    python examples/generate_activations_2d.py --lake ./lake-demo

Writes run `acts-2d` with `contexts.lance`: one row per context (tokens + [context, d_model]
activations per hook), in corpus order, with the source document and offset of each context.
"""

import argparse

from saelake import lake

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dataset", default="builtin")
p.add_argument("--hooks", default="blocks.3.hook_resid_post")
p.add_argument("--tokens", type=int, default=20_000)
p.add_argument("--context-size", type=int, default=128)
p.add_argument("--run", default="acts-2d")
args = p.parse_args()

cfg = lake.IngestConfig(
    lake=args.lake,
    model=args.model,
    dataset=args.dataset,
    hooks=args.hooks.split(","),
    tokens=args.tokens,
    context_size=args.context_size,
    layouts=["2d"],
    run=args.run,
    resume=args.run in lake.Lake(args.lake).run_names(),
)
manifest = lake.ingest(cfg)
source = lake.SnapshotSource(args.lake, args.run)
batch = next(source.context_batches(8))
hook = source.hooks[0]
norms = batch.acts[hook].float().norm(dim=-1)  # [contexts, positions]
print(
    f"run {args.run}: {manifest['contexts']} contexts of {manifest['context_size']} tokens; "
    f"first batch {tuple(batch.acts[hook].shape)}; mean norm at position 0 (BOS) {norms[:, 0].mean():.1f} "
    f"vs later positions {norms[:, 1:].mean():.1f}"
)
