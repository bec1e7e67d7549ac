"""CLT benchmark: a cross-layer transcoder over 6 layers against 6 separate per-layer transcoders with
the same total latents, trained on the same snapshot for the same tokens.

  clt   one ``clt`` (TopK per layer, k per layer): encoder i reads layer i's MLP input, decoders
        i -> j >= i write the MLP outputs; d_sae = 6 x S.
  tc6   6 TopK transcoders (MLP input of layer i -> its MLP output, S latents, the same k), trained in
        one sweep (one read of the snapshot, each its own group).

Reported: training tokens/s (the Trainer loop: reading, normalising, steps, Adam; 6 transcoders count
one token once), peak RSS of the phase's process, and FVU per output layer on held-out rows after the
same budget. Each phase runs in its own subprocess.

    python bench/clt.py                       # SmolLM2-135M layers 0-5, S = 2304, k 16 (a quiet machine)
    python bench/clt.py --model DIR --dataset FILE --layers 0-1 --ingest-tokens 2000 --context-size 32 \
        --latents 64 --k 4 --batch-size 256 --tokens 4096      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # `import train` must not find bench/


def args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lake", default="/tmp/saelake-bench-clt")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="builtin:pydoc")
    p.add_argument("--layers", default="0-5")
    p.add_argument("--ingest-tokens", type=int, default=40_000)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--latents", type=int, default=2304, help="latents per layer (S)")
    p.add_argument("--k", type=int, default=16, help="active latents per layer per token")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens (the fixed budget)")
    p.add_argument("--holdout", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    return p


def hooks(a) -> tuple[list[str], list[str]]:
    from saelake.lake.hooknames import expand_hooks

    return (
        expand_hooks([f"blocks.{{{a.layers}}}.ln2.hook_out"]),
        expand_hooks([f"blocks.{{{a.layers}}}.hook_mlp_out"]),
    )


def ensure_snapshot(a) -> None:
    from saelake import lake

    ins, outs = hooks(a)
    if "clt" not in lake.Lake(a.lake).run_names():
        lake.ingest(
            lake.IngestConfig(
                lake=a.lake,
                model=a.model,
                dataset=a.dataset,
                hooks=ins + outs,
                run="clt",
                tokens=a.ingest_tokens,
                context_size=a.context_size,
                layouts=["1d"],
            ),
            progress=False,
        )


def phase(a) -> dict:
    from saelake.train import SAEConfig, train

    ins, outs = hooks(a)
    tag = time.strftime("%H%M%S")
    if a.phase == "clt":
        saes = [SAEConfig(hooks=ins, out_hooks=outs, arch="clt", name=f"clt-{tag}", d_sae=a.latents * len(ins), k=a.k)]
    else:
        saes = [
            SAEConfig(hooks=[i], out_hooks=[o], arch="topk", name=f"tc{n}-{tag}", d_sae=a.latents, k=a.k)
            for n, (i, o) in enumerate(zip(ins, outs))
        ]
    cfgs = train(
        a.lake,
        saes,
        run="clt",
        tokens=a.tokens,
        batch_size=a.batch_size,
        repeat=True,
        holdout=a.holdout,
        device=a.device,
        progress=False,
    )
    fvu = {}
    for c in cfgs:
        fvu |= c["holdout"].get("fvu_per_hook") or {c["out_hooks"][0]: c["heldout_fvu"]}
    return {
        "tok_s": cfgs[0]["tokens_per_second"],
        "fvu": {h: fvu[h] for h in outs},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_phase(a, name: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", name] + [x for x in sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"phase {name} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> list[str]:
    a = args_parser().parse_args()
    if a.phase:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(phase(a)))
        return []
    ensure_snapshot(a)
    load = [os.getloadavg()[0]]
    clt, tc = run_phase(a, "clt"), run_phase(a, "tc6")
    load.append(os.getloadavg()[0])
    ins, outs = hooks(a)
    L = len(ins)
    line = (
        f"CLT over {L} layers ({a.model} blocks.{{{a.layers}}}.ln2.hook_out -> hook_mlp_out, {a.latents} latents "
        f"and k {a.k} per layer, batch {a.batch_size}, {a.tokens} tokens, {a.threads} threads, load "
        f"{', '.join(f'{x:.1f}' for x in load)}): {clt['tok_s']:.0f} tok/s, peak RSS {clt['peak_rss_mb']:.0f} MB, "
        f"held-out FVU per layer {[round(clt['fvu'][h], 3) for h in outs]}; {L} separate transcoders "
        f"({a.latents} latents each, one sweep): {tc['tok_s']:.0f} tok/s, peak RSS {tc['peak_rss_mb']:.0f} MB, "
        f"FVU per layer {[round(tc['fvu'][h], 3) for h in outs]}"
    )
    print(line)
    return [line]


if __name__ == "__main__":
    main()
