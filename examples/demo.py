"""`make demo`: the main job on the bundled real model and corpus.

ingest SmolLM2-135M activations over the built-in English corpus (1d + 2d) -> train a small
SAE sweep on the snapshot -> analyze -> tell the user how to look at it. Re-running resumes or
reuses what is already in the lake.
"""
import argparse
import subprocess
import sys
import time

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dataset", default="builtin")
p.add_argument("--hook", default="blocks.5.hook_resid_post")
p.add_argument("--tokens", type=int, default=40_000)
p.add_argument("--context-size", type=int, default=128)
args = p.parse_args()


def lake_cmd(*a: str) -> None:
    cmd = [sys.executable, "-m", "lake", *a]
    print("\n$ lake " + " ".join(a), flush=True)
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"demo step failed: lake {' '.join(a)}")


t0 = time.time()
import lake  # noqa: E402

existing = lake.Lake(args.lake).run_names()
lake_cmd("ingest", "--lake", args.lake, "--model", args.model, "--dataset", args.dataset, "--hooks", args.hook,
         "--tokens", str(args.tokens), "--context-size", str(args.context_size), "--layout", "1d,2d",
         "--run", "demo", *(["--resume"] if "demo" in existing else []))
lake_cmd("show", "--lake", args.lake, "demo")
lake_cmd("query", "--lake", args.lake,
         "select position, round(avg(" + args.hook.replace(".", "_") + "_norm), 2) as mean_norm, count(*) n "
         "from tokens__demo group by position order by position limit 6")
print(f"\ndemo done in {time.time() - t0:.0f} s. The lake is {args.lake}:")
print(f"  lake ls --lake {args.lake}")
print(f"  lake query --lake {args.lake} \"select * from hooks\"")
