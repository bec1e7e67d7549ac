"""Codec benchmark: what storing activations as int8 or float8 costs in accuracy, and saves in bytes.

On the bundled model (a residual-stream hook, --tokens of the built-in corpus, each dtype ingested
once into the same cached lake as bench/reader.py) it reports, per codec:

  bytes     bytes per token of the 1d table's data files (all columns), and of the hook's cells
  error     relative reconstruction error of the stored activations against the float32 run of
            the same tokens: sqrt(sum |x_codec - x|^2 / sum |x|^2), over all tokens and over the
            massive-activation tokens alone (norm > 10x the hook's median norm); plus, for
            comparison, int8 with one scale per token (no channel blocks), computed here
  FVU       a TopK SAE (d_sae 8x, k 32, batch 4096, seed 0) trained on that codec's snapshot for
            --train-tokens, evaluated on the same float32 held-out activations of other text
            (--heldout-dataset), tokens over 10x the median norm excluded as in training

Targets (issue 13): int8 at most 0.52x float16's bytes, held-out FVU within 1% (relative) of the
float16-trained SAE's.

    python bench/codecs.py [--write]          # 200k tokens; --write updates "## codecs" in bench/RESULTS.md
    python bench/codecs.py --model PATH --dataset FILE --heldout-dataset FILE --hook blocks.0.hook_resid_post \
        --tokens 4000 --context-size 32 --train-tokens 8192 --batch-size 512     # tiny smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import benchlib  # noqa: E402  (sets the offline environment)

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ["float32", "float16", "bfloat16", "int8", "float8"]


def ensure_run(a, run: str, dataset: str, dtype: str, tokens: int) -> None:
    benchlib.ensure_run(
        a.lake,
        run,
        model=a.model,
        dataset=dataset,
        hook=a.hook,
        tokens=tokens,
        context_size=a.context_size,
        dtype=dtype,
    )


def int8_per_token(x):
    """int8 with one scale per token (no channel blocks): what the block scales avoid."""
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30)
    return (x / scale).round().clamp(-127, 127) * scale


def table_bytes(lake: str, run: str) -> int:
    return sum(
        f.stat().st_size for f in (Path(lake) / "runs" / run / "tokens.lance" / "data").rglob("*") if f.is_file()
    )


def heldout_fvu(lake: str, sae_name: str, x, limit: float) -> float:
    import torch

    from saelake.train import load_sae

    sae, _ = load_sae(lake, sae_name)
    keep = x.norm(dim=-1) <= limit
    x = x[keep]
    num = den = 0.0
    mean = x.double().mean(0)
    with torch.no_grad():
        for i in range(0, len(x), 4096):
            xb = x[i : i + 4096]
            y = sae.decode(sae.encode(xb))[0]
            num += float((xb - y).double().pow(2).sum())
            den += float((xb.double() - mean).pow(2).sum())
    return num / den


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lake", default=str(Path.home() / ".cache" / "saelake-bench" / "reader-lake"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="builtin")
    p.add_argument(
        "--heldout-dataset",
        default="/usr/share/common-licenses",
        help="other text for the held-out FVU (default: Debian's licence files)",
    )
    p.add_argument("--hook", default="blocks.3.hook_resid_post")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--heldout-tokens", type=int, default=32_768)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--train-tokens", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--write", action="store_true", help="update the '## codecs' section of bench/RESULTS.md")
    a = p.parse_args()

    from saelake.lake import Lake
    from saelake.train import SAEConfig, train

    dtypes = a.dtypes.split(",")
    if "float32" not in dtypes:
        dtypes.insert(0, "float32")
    heldout_src = benchlib.heldout_text(a.heldout_dataset)
    runs = {d: f"reader-{d}-{a.tokens}" for d in dtypes}  # shared with bench/reader.py
    for d in dtypes:
        ensure_run(a, runs[d], a.dataset, d, a.tokens)
    ensure_run(a, f"heldout-float32-{a.heldout_tokens}", heldout_src, "float32", a.heldout_tokens)
    lake = Lake(a.lake)
    ref, key = benchlib.storage_rows(a.lake, runs["float32"], a.hook)
    median = lake.manifest(runs["float32"]).stats[a.hook].median_norm
    massive = ref.norm(dim=-1) > 10 * median
    x_held, _ = benchlib.storage_rows(a.lake, f"heldout-float32-{a.heldout_tokens}", a.hook)
    d = ref.shape[1]

    def rel(y, x):
        return float((y - x).norm() / x.norm())

    results = []
    base = {
        "dtype": "int8, one scale per token (not a codec)",
        "cell_bytes": d + 4,
        "rel_err": rel(int8_per_token(ref), ref),
        "rel_err_massive": rel(int8_per_token(ref[massive]), ref[massive]),
    }
    for dt in dtypes:
        x, k = benchlib.storage_rows(a.lake, runs[dt], a.hook)
        assert (k == key).all(), "codec runs must hold the same tokens in the same order"
        from saelake.lake.codecs import get_codec

        r = {
            "dtype": dt,
            "cell_bytes": get_codec(dt).width(d) * get_codec(dt).storage.itemsize,
            "table_bytes_per_token": table_bytes(a.lake, runs[dt]) / len(x),
            "rel_err": rel(x, ref),
            "rel_err_massive": rel(x[massive], ref[massive]) if massive.any() else None,
        }
        name = f"codecs-{dt}-{a.train_tokens}"
        t = time.perf_counter()
        if name not in lake.storage.listdir("saes"):
            train(
                a.lake,
                [SAEConfig(hooks=[a.hook], arch="topk", k=32, expansion=8, name=name, seed=0)],
                run=runs[dt],
                tokens=a.train_tokens,
                batch_size=a.batch_size,
                repeat=True,
                progress=True,
            )
        r["train_s"] = time.perf_counter() - t
        r["heldout_fvu"] = heldout_fvu(a.lake, name, x_held, 10 * median)
        results.append(r)
        print(
            f"{dt:9s} cell {r['cell_bytes']:5d} B, table {r['table_bytes_per_token']:7.1f} B/token, rel err "
            f"{r['rel_err']:.2e} (massive tokens {r['rel_err_massive'] or 0:.2e}), held-out FVU "
            f"{r['heldout_fvu']:.4f}",
            flush=True,
        )
    print(f"{base['dtype']}: rel err {base['rel_err']:.2e} (massive tokens {base['rel_err_massive']:.2e})")
    f16 = next((r for r in results if r["dtype"] == "float16"), None)
    if f16:
        for r in results:
            r["bytes_vs_f16"] = r["table_bytes_per_token"] / f16["table_bytes_per_token"]
            r["fvu_vs_f16"] = r["heldout_fvu"] / f16["heldout_fvu"] - 1
    if a.write:
        write_results(a, results, base, int(massive.sum()), len(ref), median)


def write_results(a, results, base, n_massive, n, median) -> None:
    load = os.getloadavg()[0]
    lines = [
        "## codecs",
        "",
        f"`python bench/codecs.py` on `{a.hook}` of the bundled SmolLM2-135M, {a.tokens:,} tokens of "
        f"`{a.dataset}`; TopK (8x, k 32, batch {a.batch_size}, seed 0) trained {a.train_tokens:,} tokens on "
        f"each codec's snapshot; held-out FVU on {a.heldout_tokens:,} float32 tokens of `{a.heldout_dataset}` "
        f"(tokens over 10x the median norm {median:.1f} excluded, as in training). {platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load:.1f} at the end. Rel. error: sqrt(sum|x_codec - x|^2 / "
        f"sum|x|^2) against the float32 run of the same tokens; massive = the {n_massive:,} of {n:,} tokens "
        "over 10x the median norm.",
        "",
        "| dtype | cell bytes | table bytes/token | vs float16 | rel. error | on massive tokens | held-out FVU "
        "| FVU vs float16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['dtype']} | {r['cell_bytes']} | {r['table_bytes_per_token']:.1f} | "
            f"{r.get('bytes_vs_f16', float('nan')):.3f} | {r['rel_err']:.2e} | "
            f"{(r['rel_err_massive'] or 0):.2e} | {r['heldout_fvu']:.4f} | {r.get('fvu_vs_f16', 0):+.2%} |"
        )
    lines.append(
        f"| {base['dtype']} | {base['cell_bytes']} | | | {base['rel_err']:.2e} | {base['rel_err_massive']:.2e} | | |"
    )
    section = "\n".join(lines) + "\n"
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text()
    start = text.find("## codecs")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end < 0 else text[end:])
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
