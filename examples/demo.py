"""`make demo`: the main job on the bundled real model and corpus.

ingest SmolLM2-135M activations over the built-in English corpus (1d + 2d) -> train a small
SAE sweep on the snapshot -> analyze -> tell the user how to look at it. Re-running resumes or
reuses what is already in the lake.
"""

import argparse
import sys
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dataset", default="builtin")
p.add_argument("--hook", default="blocks.5.hook_resid_post")
p.add_argument("--tokens", type=int, default=40_000)
p.add_argument("--context-size", type=int, default=128)
p.add_argument("--train-tokens", type=int, default=120_000)
p.add_argument("--analyze-tokens", type=int, default=20_000)
args = p.parse_args()


def lake_cmd(*a: str) -> None:
    from saelake.lake.cli import main  # in-process: a ./lake folder in the cwd cannot shadow the package

    print("\n$ lake " + " ".join(a), flush=True)
    try:
        main(list(a))
    except SystemExit as e:
        if e.code:
            sys.exit(f"demo step failed: lake {' '.join(a)}")


t0 = time.time()
from saelake import lake  # noqa: E402

L = args.lake
existing = lake.Lake(L).run_names()
# 1. ingest: 1d (shuffled tokens, for training) and 2d (contexts, for analysis)
lake_cmd(
    "ingest",
    "--lake",
    L,
    "--model",
    args.model,
    "--dataset",
    args.dataset,
    "--hooks",
    args.hook,
    "--tokens",
    str(args.tokens),
    "--context-size",
    str(args.context_size),
    "--layout",
    "1d,2d",
    "--run",
    "demo",  # a re-run resumes with the run's own chunking (older demos used other defaults)
    *(
        ["--resume", "--shuffle-buffer", str(lake.Lake(L).manifest("demo").shuffle_buffer)]
        if "demo" in existing
        else []
    ),
)
lake_cmd("show", "--lake", L, "demo")
col = args.hook.replace(".", "_")
lake_cmd(
    "query",
    "--lake",
    L,
    f"select position, round(avg({col}_norm), 1) as mean_norm, count(*) as n "
    "from tokens__demo group by position order by position limit 4",
)

# 2. a small sweep over the snapshot: every batch read once, fed to all SAEs
prefix = "demo-" + time.strftime("%H%M%S")
sweep = Path(L) / f"{prefix}.toml"
sweep.write_text(f"""run = "demo"
hook = "{args.hook}"
tokens = {args.train_tokens}
batch_size = 1024
repeat = true
expansion = 4
lr = 0.002
name = "{prefix}"

[[sae]]
name = "{prefix}-topk16"
arch = "topk"
k = 16

[[sae]]
name = "{prefix}-topk32"
arch = "topk"
k = 32

[[sae]]
name = "{prefix}-jumprelu"
arch = "jumprelu"
""")
lake_cmd("train", "--lake", L, "--config", str(sweep))
lake_cmd(
    "plot",
    "--lake",
    L,
    "--pareto",
    f"{prefix}-topk16",
    f"{prefix}-topk32",
    f"{prefix}-jumprelu",
    "-o",
    str(Path(L) / "pareto.png"),
)

# 3. analyze one SAE over the 2d contexts -> the embedded feature store
lake_cmd("analyze", "--lake", L, f"{prefix}-topk32", "--tokens", str(args.analyze_tokens))
lake_cmd("feature", "--lake", L, f"{prefix}-topk32", "0")
lake_cmd("ls", "--lake", L)

print(f"\ndemo done in {time.time() - t0:.0f} s. Look at it:")
print(f"  .venv/bin/lake serve --lake {L}        # then open http://127.0.0.1:8765")
print(f"  {Path(L) / 'pareto.png'}                   # FVU vs L0 of the sweep")
print(f'  .venv/bin/lake query --lake {L} "select name, arch, k, fvu, l0 from saes"')
