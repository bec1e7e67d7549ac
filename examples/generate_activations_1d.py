"""Generate 1d (token-shuffled) activations: the classic first step of SAE training.

    python examples/generate_activations_1d.py --lake ./lake-demo

Writes run `acts-1d` with `tokens.lance`: one row per non-BOS token, shuffled, one column per
hook. Defaults run in well under a minute on the bundled SmolLM2-135M.
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
p.add_argument("--run", default="acts-1d")
args = p.parse_args()

cfg = lake.IngestConfig(
    lake=args.lake,
    model=args.model,
    dataset=args.dataset,
    hooks=args.hooks.split(","),
    tokens=args.tokens,
    context_size=args.context_size,
    layouts=["1d"],
    run=args.run,
    resume=args.run in lake.Lake(args.lake).run_names(),
)
manifest = lake.ingest(cfg)
source = lake.SnapshotSource(args.lake, args.run)
batch = next(source.token_batches(4096, seed=0))
hook = source.hooks[0]
print(
    f"run {args.run}: {manifest['rows_1d']} token rows; first batch {tuple(batch.acts[hook].shape)} "
    f"{batch.acts[hook].dtype}, mean norm {batch.acts[hook].float().norm(dim=-1).mean():.2f} "
    f"(ingest stats: {manifest['stats'][hook]['mean_norm']:.2f})"
)
