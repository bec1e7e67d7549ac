"""Training benchmark: TopK SAE throughput against the step's FLOP-bound limit, sparse vs dense
decoding, an 8-SAE stacked sweep against 8 separate runs, FVU on held-out tokens, peak RSS.

Default sizes follow issue 3: a snapshot of the bundled SmolLM2-135M at blocks.5.hook_resid_post
(d_model 576), TopK with 8x = 4608 latents, k = 32, batch 4096, fp32, 2 threads.

  bound     the encoder forward matmul at the matmul rate measured in this run (into a reused output,
            as the trainer does: a fresh 75 MB result costs ~15 ms of page faults), plus the measured
            top-k, plus the sparse decode (embedding_bag), the sampled product for the latent
            gradients and the two sparse x dense products for the gradients of W_dec and W_enc.
  sparse    `train` (the real Trainer: reading, normalising, Adam, metrics) on the snapshot.
  dense     the same SAE with a dense decoder (scatter the top-k into [B, d_sae], dense matmuls,
            plain autograd): the reference.
  sweep     8 TopK SAEs (k 32, lr and seed varied) in one `train` call (one read, stacked steps) vs 8
            separate `train` calls (each reads the snapshot and sets up on its own); --mixed-k adds
            the same with k = 8..64 (each member pays only for its own k); --cli adds one
            `lake train --config` process against 8 `lake train` processes (what a researcher runs).
  clt       --clt: a cross-layer transcoder over 6 layers against 6 transcoders (bench/clt.py).

Each phase runs in a fresh subprocess (its peak RSS is its own).

    python bench/train.py                 # real sizes (~25 min on 2 busy cores); --write updates bench/RESULTS.md
    python bench/train.py --model DIR --dataset FILE --hook blocks.1.hook_resid_post --ingest-tokens 2000 \
        --context-size 32 --heldout-dataset FILE --d-sae 128 --k 8 --batch-size 256 --steps 4 --fvu-tokens 2048   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import benchlib

HERE = Path(__file__).resolve().parent


def args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lake", default="/tmp/saelake-bench-train")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="builtin:pydoc")
    p.add_argument(
        "--heldout-dataset", default="/usr/share/common-licenses", help="other text (default: Debian's licence files)"
    )
    p.add_argument("--hook", default="blocks.5.hook_resid_post")
    p.add_argument("--ingest-tokens", type=int, default=40_000)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20, help="steps per throughput measurement")
    p.add_argument("--fvu-tokens", type=int, default=2_000_000, help="training tokens for the FVU comparison")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the throughput phases (medians)")
    p.add_argument("--mixed-k", action="store_true", help="also a sweep of 8 with k 8..64 against 8 separate runs")
    p.add_argument(
        "--cli",
        action="store_true",
        help="also time one `lake train --config` sweep process against 8 `lake train` processes",
    )
    p.add_argument(
        "--clt",
        action="store_true",
        help="also the CLT row: bench/clt.py (a CLT over 6 layers vs 6 "
        "transcoders with the same total latents: tok/s, peak RSS, FVU per layer) at its defaults",
    )
    p.add_argument("--write", action="store_true", help="write the results into bench/RESULTS.md")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    return p


def ensure_snapshot(a) -> None:
    from saelake import lake

    for run, ds in (("bench", a.dataset), (heldout_run(a), benchlib.heldout_text(a.heldout_dataset))):
        if run not in lake.Lake(a.lake).run_names():
            lake.ingest(
                lake.IngestConfig(
                    lake=a.lake,
                    model=a.model,
                    dataset=ds,
                    hooks=[a.hook],
                    tokens=a.ingest_tokens if run == "bench" else 8192,
                    context_size=a.context_size,
                    layouts=["1d"],
                    run=run,
                ),
                progress=False,
            )


def heldout_run(a) -> str:
    """The held-out run's name says which text it holds (a lake may have several)."""
    return "heldout-" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(a.heldout_dataset).name or a.heldout_dataset)[:60]


def timeit(f, n=5):
    f()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def phase_bound(a) -> dict:
    """The step's bound, each primitive timed with 1 and with all threads (the faster counts)."""
    import torch
    import torch.nn.functional as F

    B, d, S, k = a.batch_size, a.d_in, a.d_sae, a.k
    x, W = torch.randn(B, d), torch.randn(d, S) / d**0.5
    Wd = torch.randn(S, d)
    pre = x @ W
    idx = pre.topk(k, dim=-1).indices.reshape(-1)
    vals = torch.rand(B * k)
    offs = torch.arange(0, B * k, k)
    g = torch.randn(B, d)
    crow = torch.arange(0, B * k + 1, k)
    bag = torch.arange(B).repeat_interleave(k)
    pattern = torch.sparse_csr_tensor(crow, idx, torch.zeros(B * k), (B, S))

    def sort():  # latent-major order of the entries, shared by both weight gradients
        perm = torch.argsort(idx, stable=True)
        crow_t = torch.zeros(S + 1, dtype=torch.long)
        crow_t[1:] = torch.bincount(idx, minlength=S).cumsum(0)
        return perm, crow_t

    perm, crow_t = sort()
    At = torch.sparse_csr_tensor(crow_t, bag[perm], vals[perm], (S, B))

    def best(f):
        threads = a.threads
        out = []
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            out.append(timeit(f))
        torch.set_num_threads(threads)
        return min(out)

    out = torch.empty(B, S)  # the trainer writes pre-activations into a reused buffer: no page faults
    t_mm = timeit(lambda: torch.mm(x, W, out=out))  # the matmul rate: all threads
    t_topk = best(lambda: pre.topk(k, dim=-1, sorted=False))
    t_dec = best(lambda: F.embedding_bag(idx, Wd, offs, mode="sum", per_sample_weights=vals))
    t_sddmm = best(lambda: torch.sparse.sampled_addmm(pattern, g, Wd.t(), beta=0))
    t_sort = best(sort)
    t_spmm = best(lambda: torch.sparse.mm(At, g))
    step = t_mm + t_topk + t_dec + t_sddmm + t_sort + 2 * t_spmm
    return {
        "matmul_gflops": 2 * B * d * S / t_mm / 1e9,
        "t_encoder_matmul": t_mm,
        "t_topk": t_topk,
        "t_sparse_decode": t_dec,
        "t_sampled_grad": t_sddmm,
        "t_sort": t_sort,
        "t_sparse_weight_grad": t_spmm,
        "bound_step_s": step,
        "bound_tok_s": B / step,
    }


def phase_sparse(a, tokens=None, names=("sparse",), ks=None, lrs=None, heldout=False) -> dict:
    from saelake.train import SAEConfig, train

    tokens = tokens or a.steps * a.batch_size
    ks = ks or [a.k] * len(names)
    lrs = lrs or [None] * len(names)
    tag = f"{time.time_ns()}"
    # throughput runs: the dead-latent window of a long run (1M tokens), so that AuxK does not switch on
    # after a few steps of a 20-step measurement; the FVU run keeps the default (tokens / 4)
    dead = None if heldout else 1_000_000
    saes = [
        SAEConfig(hooks=[a.hook], name=f"{n}-{tag}", arch="topk", d_sae=a.d_sae, k=kk, lr=lr, seed=i, dead_window=dead)
        for i, (n, kk, lr) in enumerate(zip(names, ks, lrs))
    ]
    t = time.perf_counter()
    cfgs = train(
        a.lake,
        saes,
        run="bench",
        tokens=tokens,
        batch_size=a.batch_size,
        repeat=True,
        progress=False,
        device=a.device,
        checkpoint_every=10**9,
        log_every=max(1, tokens // a.batch_size // 10),
    )
    wall = time.perf_counter() - t
    out = {
        "wall_s": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "train_tok_s": cfgs[0]["tokens_per_second"],
        "loop_s": tokens / cfgs[0]["tokens_per_second"],
        "fvu_train_window": [c["fvu"] for c in cfgs],
    }
    if heldout:
        out["fvu_heldout"] = heldout_fvu(a, saes[0].name)
    return out


def heldout_fvu(a, name, sae=None) -> float:
    import torch

    from saelake.lake import SnapshotSource
    from saelake.train import load_sae

    if sae is None:
        sae, _ = load_sae(a.lake, name)
    src = SnapshotSource(a.lake, heldout_run(a))
    sq = var = 0.0
    with torch.no_grad():
        for b in src.token_batches(4096, [a.hook], seed=0):
            x = b.acts[a.hook].float()
            keep = x.norm(dim=-1) <= 10 * src.manifest.stats[a.hook].median_norm  # as in training
            x = x[keep]
            sq += float((sae(x)[0] - x).pow(2).sum())
            var += float((x - x.mean(0)).pow(2).sum())
    return sq / var


def phase_dense(a, tokens=None, heldout=False) -> dict:
    """Reference: TopK with a dense decoder and plain autograd, same data, init and schedule."""
    import math

    import torch

    from saelake.lake import SnapshotSource
    from saelake.train import dictionaries

    tokens = tokens or a.steps * a.batch_size
    src = SnapshotSource(a.lake, "bench")
    st = src.manifest.stats[a.hook]
    scale, limit = math.sqrt(a.d_in) / st.mean_norm, 10 * st.median_norm
    m = dictionaries.get("topk").build(a.d_in, a.d_sae, k=a.k)
    m.initialize([torch.Generator().manual_seed(0)])
    params = [m.W_enc_t, m.b_enc, m.W_dec, m.b_dec]
    lr = 2e-4 / (a.d_sae / 2**14) ** 0.5
    opt = torch.optim.Adam(params, lr=lr)
    steps = math.ceil(tokens / a.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1, (s + 1) / max(1, round(0.02 * steps))) * (min(1, (steps - s) / max(1, round(0.2 * steps)))),
    )
    t = time.perf_counter()
    first = True
    for i, b in enumerate(src.token_batches(a.batch_size, [a.hook], seed=0, repeat=True)):
        if i >= steps:
            break
        x = b.acts[a.hook].float()
        x = x[x.norm(dim=-1) <= limit] * scale
        if first:
            with torch.no_grad():
                m.b_dec[0] = x.mean(0)
            first = False
        pre = (x - m.b_dec[0]) @ m.W_enc[0] + m.b_enc[0]
        v, idx = pre.topk(a.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(1, idx, torch.relu(v))
        x_hat = acts @ m.W_dec[0] + m.b_dec[0]
        loss = (x_hat - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            m.normalize_decoder()
    wall = time.perf_counter() - t
    out = {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall}
    if heldout:
        with torch.no_grad():  # fold the scale for raw activations
            m.b_dec /= scale
            m.b_enc /= scale
        m.inference()
        out["fvu_heldout"] = heldout_fvu(a, None, m)
    return out


def run_phase(a, phase: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase] + [x for x in sys.argv[1:] if x != "--write"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"phase {phase} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


SWEEP_LRS = [x * 1e-4 for x in (2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0)]
SWEEP_KS = [8, 12, 16, 24, 32, 40, 48, 64]


def separate(a, tok, ks, lrs) -> dict:
    runs = [phase_sparse(a, tok, [f"sep{i}"], [kk], [lr]) for i, (kk, lr) in enumerate(zip(ks, lrs))]
    return {"runs": runs, "wall_s": sum(r["wall_s"] for r in runs)}


def cli_comparison(a) -> dict:
    """What a researcher runs: one `lake train --config sweep.toml` process against 8 `lake train`
    processes (each pays its own interpreter start, imports and snapshot setup)."""
    import tempfile

    tok, tag = a.steps * a.batch_size, time.time_ns()
    with tempfile.TemporaryDirectory() as tmp:
        toml = [
            'run = "bench"',
            f'hook = "{a.hook}"',
            f"tokens = {tok}",
            f"batch_size = {a.batch_size}",
            "repeat = true",
            'arch = "topk"',
            "checkpoint_every = 1000000000",
            f"d_sae = {a.d_sae}",
            f"k = {a.k}",
            "dead_window = 1000000",
        ]
        for i, lr in enumerate(SWEEP_LRS):
            toml += ["[[sae]]", f'name = "cli-sw{i}-{tag}"', f"lr = {lr}", f"seed = {i}"]
        cfg = Path(tmp) / "sweep.toml"
        cfg.write_text("\n".join(toml) + "\n")
        lake_cmd = [sys.executable, "-m", "saelake.lake", "train", "--lake", a.lake, "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        t = time.perf_counter()
        subprocess.run(lake_cmd + ["--config", str(cfg)], check=True, env=env, capture_output=True)
        sweep = time.perf_counter() - t
        t = time.perf_counter()
        for i, lr in enumerate(SWEEP_LRS):
            subprocess.run(
                lake_cmd
                + [
                    "--run",
                    "bench",
                    "--hook",
                    a.hook,
                    "--arch",
                    "topk",
                    "--d-sae",
                    str(a.d_sae),
                    "--k",
                    str(a.k),
                    "--lr",
                    str(lr),
                    "--seed",
                    str(i),
                    "--tokens",
                    str(tok),
                    "--batch-size",
                    str(a.batch_size),
                    "--repeat",
                    "--dead-window",
                    "1000000",
                    "--checkpoint-every",
                    "1000000000",
                    "--name",
                    f"cli-sep{i}-{tag}",
                ],
                check=True,
                env=env,
                capture_output=True,
            )
        separate_s = time.perf_counter() - t
    return {"sweep_s": sweep, "separate_s": separate_s}


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def main():
    a = args_parser().parse_args()
    if a.phase:
        import torch

        from saelake.lake import SnapshotSource

        a.d_in = SnapshotSource(a.lake, "bench").d_model[a.hook]
        torch.set_num_threads(a.threads)
        tok = a.steps * a.batch_size
        same_k, same_lr = [a.k] * 8, [None] * 8
        res = {
            "bound": lambda: phase_bound(a),
            "sparse": lambda: phase_sparse(a),
            "dense": lambda: phase_dense(a),
            "sweep8": lambda: phase_sparse(a, tok, [f"sw{i}" for i in range(8)], same_k, SWEEP_LRS),
            "separate8": lambda: separate(a, tok, same_k, SWEEP_LRS),
            "sweep8k": lambda: phase_sparse(a, tok, [f"swk{i}" for i in range(8)], SWEEP_KS, same_lr),
            "separate8k": lambda: separate(a, tok, SWEEP_KS, same_lr),
            "fvu_sparse": lambda: phase_sparse(a, a.fvu_tokens, heldout=True),
            "fvu_dense": lambda: phase_dense(a, a.fvu_tokens, heldout=True),
        }[a.phase]()
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    ensure_snapshot(a)
    load = [os.getloadavg()[0]]
    rounds: dict[str, list] = {}
    for _ in range(a.rounds):  # interleaved: A, B, A, B...; medians below
        for ph in ("bound", "sparse", "dense", "sweep8", "separate8") + (
            ("sweep8k", "separate8k") if a.mixed_k else ()
        ):
            rounds.setdefault(ph, []).append(run_phase(a, ph))
        load.append(os.getloadavg()[0])
    cli = [cli_comparison(a) for _ in range(a.rounds)] if a.cli else []
    r = {ph: run_phase(a, ph) for ph in ("fvu_sparse", "fvu_dense")} if a.fvu_tokens else {}
    load.append(os.getloadavg()[0])
    med = lambda ph, key: median([x[key] for x in rounds[ph]])  # noqa: E731
    b = {key: med("bound", key) for key in rounds["bound"][0] if key != "peak_rss_mb"}
    sparse_loop = med("sparse", "loop_s")
    tok = a.steps * a.batch_size
    sparse_tok_s = tok / sparse_loop
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {a.threads}, "
        f"device {a.device}; load average (1 min) during the run: {', '.join(f'{x:.1f}' for x in load)}",
        f"setup: {a.model} {a.hook}, TopK d_sae {a.d_sae}, k {a.k}, batch {a.batch_size}, fp32; "
        f"{a.steps} steps per throughput run; {a.rounds} interleaved rounds, medians",
        f"matmul rate: {b['matmul_gflops']:.0f} GFLOP/s; step bound (each primitive at its faster thread count): "
        f"encoder {b['t_encoder_matmul'] * 1e3:.0f} ms + topk {b['t_topk'] * 1e3:.0f} ms + sparse decode "
        f"{b['t_sparse_decode'] * 1e3:.0f} ms + latent grads {b['t_sampled_grad'] * 1e3:.0f} ms + latent-major sort "
        f"{b['t_sort'] * 1e3:.0f} ms + 2 x weight grads {b['t_sparse_weight_grad'] * 1e3:.0f} ms "
        f"= {b['bound_step_s'] * 1e3:.0f} ms -> {b['bound_tok_s']:.0f} tok/s",
        f"sparse TopK (Trainer loop: reading, normalising, step, Adam, metrics every {max(1, a.steps // 10)} steps): "
        f"{sparse_tok_s:.0f} tok/s = {sparse_tok_s / b['bound_tok_s']:.0%} of the bound "
        f"({[round(tok / x['loop_s']) for x in rounds['sparse']]}); with setup and saving: "
        f"{tok / med('sparse', 'wall_s'):.0f} tok/s; peak RSS {med('sparse', 'peak_rss_mb'):.0f} MB",
        f"dense-decoder TopK reference: {med('dense', 'tok_s'):.0f} tok/s; peak RSS {med('dense', 'peak_rss_mb'):.0f} MB",
        f"sweep of 8 (k {a.k}, lr 2e-4..1.2e-3, seeds 0..7; stacked, one read): {med('sweep8', 'wall_s'):.1f} s vs "
        f"8 separate runs (each with its own reading and setup) {med('separate8', 'wall_s'):.1f} s "
        f"({med('separate8', 'wall_s') / med('sweep8', 'wall_s'):.2f}x; per round "
        f"{[round(x['wall_s'], 1) for x in rounds['sweep8']]} vs {[round(x['wall_s'], 1) for x in rounds['separate8']]}); "
        f"peak RSS {med('sweep8', 'peak_rss_mb'):.0f} MB vs {med('separate8', 'peak_rss_mb'):.0f} MB",
    ]
    if a.mixed_k:
        lines.append(
            f"sweep of 8 with k 8..64 (stacked, each member its own top-k): {med('sweep8k', 'wall_s'):.1f} s "
            f"vs 8 separate runs {med('separate8k', 'wall_s'):.1f} s "
            f"({med('separate8k', 'wall_s') / med('sweep8k', 'wall_s'):.2f}x)"
        )
    if cli:
        sw, sep = median([c["sweep_s"] for c in cli]), median([c["separate_s"] for c in cli])
        lines.append(
            f"as processes: one `lake train --config` sweep of 8 {sw:.1f} s vs 8 `lake train` processes "
            f"{sep:.1f} s ({sep / sw:.2f}x; per round {[round(c['sweep_s'], 1) for c in cli]} vs "
            f"{[round(c['separate_s'], 1) for c in cli]})"
        )
    if r:
        lines.append(
            f"held-out FVU after {a.fvu_tokens} training tokens ({a.heldout_dataset}, 8k tokens): sparse "
            f"{r['fvu_sparse']['fvu_heldout']:.4f} ({r['fvu_sparse']['tok_s']:.0f} tok/s incl. setup), dense "
            f"reference {r['fvu_dense']['fvu_heldout']:.4f} ({r['fvu_dense']['tok_s']:.0f} tok/s)"
        )
    if a.clt:
        p = subprocess.run(
            [
                sys.executable,
                str(HERE / "clt.py"),
                "--model",
                a.model,
                "--dataset",
                a.dataset,
                "--threads",
                str(a.threads),
                "--device",
                a.device,
            ],
            capture_output=True,
            text=True,
        )
        if p.returncode:
            sys.exit(f"bench/clt.py failed:\n{p.stderr[-3000:]}")
        lines.append(p.stdout.strip().splitlines()[-1])
    print("\n".join(lines))
    if a.write:
        path = HERE / "RESULTS.md"
        text = path.read_text() if path.exists() else "# Benchmark results\n"
        section = (
            "## train\n\n`python bench/train.py` ("
            + time.strftime("%Y-%m-%d")
            + ")\n\n"
            + "\n".join(f"- {ln}" for ln in lines)
            + "\n"
        )
        if "## train" in text:
            text = re.sub(r"## train\n.*?(?=\n## |\Z)", section.rstrip("\n") + "\n", text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n" + section
        path.write_text(text)


if __name__ == "__main__":
    main()
