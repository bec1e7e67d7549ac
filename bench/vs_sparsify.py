"""Quality against EleutherAI's sparsify on identical rows in identical order (issue 14).

Both trainers see the same activations: the bundled SmolLM2-135M at --hook over the built-in corpus
(one float32 snapshot, cached), the same 4096-row batches in the same order (the stream saelake's
trainer reads, replayed by row index for sparsify), the same budget, TopK d_sae 4608, k 32. Each
trained SAE is then scored by one plain implementation here on the same held-out rows of other
text (Debian's licence files): FVU = sum |x - x_hat|^2 / sum |x - mean|^2, on all held-out rows
and on those under 10x the median norm.

sparsify runs in its own venv (eai-sparsify 1.3.3, built on first use under the bench cache), by
bench/sparsify_loop.py: its SparseCoder, loss, decoder renormalisation and gradient projection, in
the outer loop of its Trainer (b_dec = first batch's mean, Adam). saelake runs `train()` as a user
would, with one SAEConfig per variant (--variants; each changes one thing at a time).

    python bench/vs_sparsify.py [--write]             # ~10 runs of 2M tokens: about an hour on 2 cores
    python bench/vs_sparsify.py --variants sparsify,ours-sparsify-settings --tokens 409600
    python bench/vs_sparsify.py --extra 'mine:lr_warmup=0,aux_coef=0'   # any SAEConfig keys

Results (held-out FVU, seconds, step traces) are cached per variant under --work; --fresh reruns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import benchlib
import numpy as np
from benchlib import CACHE, ensure_run, heldout_text

HERE = Path(__file__).resolve().parent
SPARSIFY = "eai-sparsify==1.3.3"

# name -> ("sparsify", loop flags) or ("saelake", SAEConfig keys; lr "sparsify": sparsify's rule, as --lr).
# "sparsify settings": Adam at sparsify's learning rate, constant, no AuxK, raw activations, every row.
# Each "+" variant changes one thing; "ours-default" is saelake's defaults, lr included.
SPARSIFY_SETTINGS = {
    "lr": "sparsify",
    "lr_warmup": 0.0,
    "lr_decay": 0.0,
    "aux_coef": 0.0,
    "normalize": "none",
    "outlier_factor": 0,
}
VARIANTS = {
    "sparsify": ("sparsify", {}),
    "sparsify-no-grad-projection": ("sparsify", {"no_grad_projection": True}),
    "sparsify-from-our-old-init": ("sparsify", {"init": "unit-encoder"}),
    "ours-sparsify-settings": ("saelake", SPARSIFY_SETTINGS),
    "ours-sparsify-settings-unit-encoder": ("saelake", SPARSIFY_SETTINGS | {"init_encoder_norm": 1.0}),
    "ours-sparsify-settings+normalize": ("saelake", SPARSIFY_SETTINGS | {"normalize": "dataset"}),
    "ours-sparsify-settings+outliers": ("saelake", SPARSIFY_SETTINGS | {"outlier_factor": 10.0}),
    "ours-sparsify-settings+auxk": ("saelake", SPARSIFY_SETTINGS | {"aux_coef": 1 / 32}),
    "ours-sparsify-settings+schedule": ("saelake", SPARSIFY_SETTINGS | {"lr_warmup": 0.02, "lr_decay": 0.2}),
    "ours-default-before": ("saelake", {"lr": "sparsify", "init_encoder_norm": 1.0}),  # before issue 14
    "ours-default@sparsify-lr": ("saelake", {"lr": "sparsify"}),
    "ours-default": ("saelake", {}),
}


def args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lake", default=str(CACHE / "sparsify-lake"))
    p.add_argument("--work", default=str(CACHE / "vs-sparsify"), help="exported rows and per-variant results")
    p.add_argument("--venv", default=str(CACHE / "sparsify-venv"), help="eai-sparsify's venv (built on first use)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="builtin")
    p.add_argument("--heldout-dataset", default="/usr/share/common-licenses")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--ingest-tokens", type=int, default=2_000_000, help="capped by the corpus (~367k rows)")
    p.add_argument("--heldout-tokens", type=int, default=65_536)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2_048_000, help="training budget (rows, repeating the snapshot)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="sparsify's lr (default: its rule, 2e-4/sqrt(d_sae/2^14))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    p.add_argument("--extra", action="append", default=[], help="NAME:key=value,... an extra saelake variant")
    p.add_argument("--fresh", action="store_true", help="rerun variants whose results are cached")
    p.add_argument("--write", action="store_true", help='update "## quality vs sparsify" in bench/RESULTS.md')
    return p


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import sparsify"], capture_output=True).returncode == 0:
        return py
    print(f"building sparsify's venv at {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # torch first: the CPU wheel (a plain dependency resolution would pull CUDA's)
    subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", SPARSIFY], check=True)
    return py


def export(a, work: Path, run: str, heldout_run: str) -> dict:
    """rows.npy (the snapshot in storage order, float32), order.npy (the row of each position of the
    stream saelake's trainer reads: holdout 0, data seed 0) and heldout.npy; cached."""
    from saelake.lake import SnapshotSource

    steps = -(-a.tokens // a.batch_size)
    files = {
        "rows": work / f"rows-{run}.npy",
        "heldout": work / f"heldout-{heldout_run}.npy",
        "order": work / f"order-{run}-{a.batch_size}x{steps}.npy",
    }
    work.mkdir(parents=True, exist_ok=True)
    for key, r in (("rows", run), ("heldout", heldout_run)):
        if not files[key].exists():
            x, _ = benchlib.storage_rows(a.lake, r, a.hook)
            save_npy(files[key], x.numpy())
    if not files["order"].exists():
        _, key_of = benchlib.storage_rows(a.lake, run, a.hook, acts=False)
        sorter = np.argsort(key_of)
        order, at = np.empty(steps * a.batch_size, dtype=np.int32), 0
        for b in SnapshotSource(a.lake, run).token_batches(a.batch_size, [a.hook], seed=0, repeat=True):
            idx = sorter[np.searchsorted(key_of, b.context_id.numpy() * 100_000 + b.position.numpy(), sorter=sorter)]
            n = min(len(idx), len(order) - at)
            order[at : at + n] = idx[:n]
            at += n
            if at == len(order):
                break
        save_npy(files["order"], order)
    return files


def save_npy(path: Path, array) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def heldout_fvu(w: dict, x, k: int, limit: float) -> dict:
    """FVU of raw-activation weights (W_enc [d, S], b_enc, W_dec [S, d], b_dec) on rows ``x``: all rows,
    and rows with norm <= limit. One implementation for every trainer's SAE."""
    import torch

    out = {}
    for label, rows in (("all", x), ("under_10x_median", x[x.norm(dim=-1) <= limit])):
        num, mean = 0.0, rows.double().mean(0)
        with torch.no_grad():
            for i in range(0, len(rows), 4096):
                xb = rows[i : i + 4096]
                pre = (xb - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
                top = pre.topk(k, dim=-1)
                acts = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.clamp_min(0))
                num += float((xb - (acts @ w["W_dec"] + w["b_dec"])).double().pow(2).sum())
        out[label] = num / float((rows.double() - mean).pow(2).sum())
        out[f"rows_{label}"] = len(rows)
    return out


def run_sparsify(a, py: Path, name: str, flags: dict, files: dict, work: Path, lr: float) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    out = work / name
    cmd = [str(py), str(HERE / "sparsify_loop.py"), "--rows", str(files["rows"]), "--order", str(files["order"])]
    cmd += ["--batch-size", str(a.batch_size), "--d-sae", str(a.d_sae), "--k", str(a.k), "--lr", repr(lr)]
    cmd += ["--seed", str(a.seed), "--threads", str(a.threads), "--out", str(out)]
    if flags.get("init") == "unit-encoder":  # our former initial weights (tied, unit rows), in sparsify's names
        from saelake.train.dictionaries import get

        d = int(np.load(files["rows"], mmap_mode="r").shape[1])
        sae = get("topk").build(d, a.d_sae, k=a.k, init_encoder_norm=1.0)
        sae.initialize([torch.Generator().manual_seed(a.seed)])
        init = work / "unit-encoder-init.safetensors"
        save_file(
            {
                "encoder.weight": sae.W_enc[0].t().contiguous(),
                "encoder.bias": sae.b_enc[0].clone(),
                "W_dec": sae.W_dec[0].clone(),
                "b_dec": sae.b_dec[0].clone(),
            },
            str(init),
        )
        cmd += ["--init", str(init)]
    for key in ("auxk_alpha", "schedule"):
        if key in flags:
            cmd += [f"--{key.replace('_', '-')}", str(flags[key])]
    if flags.get("no_grad_projection"):
        cmd.append("--no-grad-projection")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), SPARSIFY_DISABLE_TRITON="1")
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - t
    w = load_file(str(out / "sae.safetensors"))
    trace = json.loads((out / "trace.json").read_text())
    weights = {"W_enc": w["encoder.weight"].t(), "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    return {"weights": weights, "seconds": seconds, "loop_seconds": trace["seconds"], "trace": trace["trace"]}


def run_ours(a, name: str, keys: dict, lr: float, run: str) -> dict:
    from saelake.train import SAEConfig, SAEStore, load_sae, train

    store = SAEStore(a.lake)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    full = f"vs-sparsify-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"  # SAE names are claimed once
    t = time.perf_counter()
    keys = keys | ({"lr": lr} if keys.get("lr") == "sparsify" else {})
    cfg = SAEConfig(hooks=[a.hook], arch="topk", k=a.k, d_sae=a.d_sae, name=full, seed=a.seed, **keys)
    (final,) = train(
        a.lake, [cfg], run=run, tokens=a.tokens, batch_size=a.batch_size, repeat=True, holdout=0, progress=True
    )
    seconds = time.perf_counter() - t
    sae, _ = load_sae(a.lake, full)
    s = sae.member_state(0)
    trace = {}
    for row in store.metrics(full):
        trace.setdefault(row["step"], {"step": row["step"]})[row["name"]] = row["value"]
    return {
        "sae": full,
        "weights": {k: s[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
        "seconds": seconds,
        "loop_seconds": final["train_seconds"],
        "tokens_dropped_outliers": final["tokens_dropped_outliers"],
        "trace": list(trace.values()),
    }


def training_code() -> str:
    """What a cached saelake result depends on: the git trees of train/ and lake/ (+ uncommitted changes)."""

    def git(*args):
        return subprocess.run(["git", "-C", str(HERE.parent), *args], capture_output=True, text=True).stdout.strip()

    trees = [git("rev-parse", f"HEAD:{d}")[:8] for d in ("train", "lake")]
    return "-".join(trees) + ("+dirty" if git("status", "--porcelain", "train", "lake") else "")


def parse_extra(text: str) -> tuple[str, tuple[str, dict]]:
    name, _, body = text.partition(":")
    keys = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        keys[k.strip()] = json.loads(v) if v.strip()[:1] in "-0123456789tfn[{" else v.strip()
    return name, ("saelake", keys)


def main() -> None:
    a = args_parser().parse_args()
    import torch

    from saelake.lake import Lake

    torch.set_num_threads(a.threads)
    variants = {n: VARIANTS[n] for n in a.variants.split(",") if n} | dict(parse_extra(e) for e in a.extra)
    unknown = [n for n in a.variants.split(",") if n and n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}: known: {', '.join(VARIANTS)}")
    lr = a.lr or 2e-4 / (a.d_sae / 2**14) ** 0.5  # sparsify's rule for Adam
    run, heldout_run = "builtin-l15" if a.hook == "blocks.15.hook_resid_post" else f"builtin-{a.hook}", "heldout"
    common = dict(model=a.model, hook=a.hook, context_size=a.context_size, dtype="float32")
    ensure_run(a.lake, run, dataset=a.dataset, tokens=a.ingest_tokens, **common)
    ensure_run(a.lake, heldout_run, dataset=heldout_text(a.heldout_dataset), tokens=a.heldout_tokens, **common)
    median = Lake(a.lake).manifest(run).stats[a.hook].median_norm
    work = Path(a.work)
    files = export(a, work, run, heldout_run)
    x_held = torch.from_numpy(np.load(files["heldout"]))
    setup = f"{a.hook} d_sae {a.d_sae} k {a.k} batch {a.batch_size} tokens {a.tokens} lr {lr:.3g} seed {a.seed}"
    code = training_code()
    results = {}
    for name, (who, keys) in variants.items():
        cached = work / "results" / f"{name}.json"
        if cached.exists() and not a.fresh:
            r = json.loads(cached.read_text())
            if r.get("setup") == setup and r.get("keys") == keys and (who == "sparsify" or r.get("code") == code):
                results[name] = r
                print(f"{name:40s} held-out FVU {r['heldout']['all']:.4f} (cached)", flush=True)
                continue
        print(f"== {name}: {who} {keys or ''}", flush=True)
        load = os.getloadavg()[0]
        if who == "sparsify":
            r = run_sparsify(a, ensure_venv(Path(a.venv)), name, keys, files, work, lr)
        else:
            r = run_ours(a, name, keys, lr, run)
        r["heldout"] = heldout_fvu(r.pop("weights"), x_held, a.k, 10 * median)
        r |= {
            "setup": setup,
            "keys": keys,
            "code": code,
            "who": who,
            "load_before": load,
            "load_after": os.getloadavg()[0],
        }
        r["tokens_per_second"] = a.tokens / r["loop_seconds"]
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(r, indent=1))
        results[name] = r
        print(
            f"{name:40s} held-out FVU {r['heldout']['all']:.4f} "
            f"(under 10x median {r['heldout']['under_10x_median']:.4f}), {r['tokens_per_second']:.0f} tok/s",
            flush=True,
        )
    print(f"\n{setup}; held-out rows {len(x_held):,} of other text")
    print(f"{'variant':40s} {'FVU all':>8s} {'<10x med':>8s} {'tok/s':>7s}  final train FVU, dead")
    for name, r in results.items():
        last = next((t for t in reversed(r["trace"]) if "fvu" in t), {})
        print(
            f"{name:40s} {r['heldout']['all']:8.4f} {r['heldout']['under_10x_median']:8.4f} "
            f"{r['tokens_per_second']:7.0f}  {last.get('fvu', float('nan')):.4f}, "
            f"{last.get('dead_fraction', float('nan')):.3f}"
        )
    if a.write:
        write_results(a, results, setup, len(x_held))


BEGIN, END = "<!-- vs_sparsify.py table -->", "<!-- /vs_sparsify.py table -->"


def write_results(a, results: dict, setup: str, n_held: int) -> None:
    """Replace the table between the markers in "## quality vs sparsify" (the prose around it is kept);
    without the section, append one."""
    path = HERE / "RESULTS.md"
    lines = [
        BEGIN,
        f"`python bench/vs_sparsify.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.machine()}, {os.cpu_count()} cores, {a.threads} threads; setup: {setup}; held-out: "
        f"{n_held:,} rows of other text)",
        "",
        "| variant | held-out FVU, rows < 10x median norm | all rows | tok/s | load (1 min) | code |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['heldout']['under_10x_median']:.4f} | {r['heldout']['all']:.4f} | "
            f"{r['tokens_per_second']:.0f} | {r['load_before']:.1f} | {r.get('code', '') if r['who'] == 'saelake' else ''} |"
        )
    table = "\n".join(lines + [END])
    text = path.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + table + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## quality vs sparsify\n\n" + table + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
