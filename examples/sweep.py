"""A sweep: many SAEs over one snapshot, each batch read once and fed to all of them.

    python examples/sweep.py --lake ./lake-demo

Ingests a 1d snapshot if the run is missing, writes a sweep TOML (TopK at several k, plus a
BatchTopK and a JumpReLU), trains it in one pass (same-shape SAEs are stacked and stepped
together), and draws the FVU-vs-L0 Pareto plot. About a minute at the defaults on SmolLM2-135M.
"""

import argparse
import sys
import time
from pathlib import Path

from saelake import lake
from saelake.lake.cli import main

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dataset", default="builtin")
p.add_argument("--hook", default="blocks.5.hook_resid_post")
p.add_argument("--run", default="cached")
p.add_argument("--ingest-tokens", type=int, default=20_000)
p.add_argument("--tokens", type=int, default=40_000)
p.add_argument("--batch-size", type=int, default=1024)
p.add_argument("--context-size", type=int, default=128)
p.add_argument("--expansion", type=float, default=4)
p.add_argument("--ks", default="8,16,32")
p.add_argument("--out", default="pareto.png")
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
prefix = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
ks = [int(k) for k in args.ks.split(",")]
toml = [
    f'run = "{args.run}"',
    f'hook = "{args.hook}"',
    f"tokens = {args.tokens}",
    f"batch_size = {args.batch_size}",
    "repeat = true",
    "lr = 0.002",
    f"expansion = {args.expansion}",
    f'name = "{prefix}"',
]
toml += [f'[[sae]]\nname = "{prefix}-topk{k}"\narch = "topk"\nk = {k}' for k in ks]
toml += [
    f'[[sae]]\nname = "{prefix}-batchtopk{ks[-1]}"\narch = "batchtopk"\nk = {ks[-1]}',
    f'[[sae]]\nname = "{prefix}-jumprelu"\narch = "jumprelu"\nl1 = 0.1',
]
path = Path(f"{prefix}.toml")
path.write_text("\n".join(toml) + "\n")
print(path.read_text())


def lake_cmd(*a):
    """The `lake` command, in this process (a ./lake folder in the cwd would shadow `python -m lake`)."""
    print("$ lake " + " ".join(a), flush=True)
    try:
        main(list(a))
    except SystemExit as e:
        if e.code:
            sys.exit(f"failed: lake {' '.join(a)}")


t0 = time.time()
lake_cmd("train", "--lake", args.lake, "--config", str(path))
print(f"{len(ks) + 2} SAEs from one pass over the snapshot in {time.time() - t0:.0f} s")
names = [f"{prefix}-topk{k}" for k in ks] + [f"{prefix}-batchtopk{ks[-1]}", f"{prefix}-jumprelu"]
lake_cmd("plot", "--lake", args.lake, "--pareto", *names, "-o", args.out)
lake_cmd(
    "query",
    "--lake",
    args.lake,
    f"select name, arch, k, round(fvu, 3) fvu, round(l0, 1) l0 from saes where name like '{prefix}%' order by l0",
)
path.unlink()
