"""Analysis throughput vs the SAE encoder alone, and peak RSS at two token counts.

    python bench/analyze.py [--lake /tmp/saelake-bench] [--tokens 24576]

Needs a 2d snapshot of the bundled SmolLM2-135M (made on first use: run `b2d`, hook
blocks.3.hook_resid_post, context 128) and a TopK SAE on it (`bench-topk`: 8 x 576 latents,
k 32, tied random init saved through train's SAEStore; the cost per token does not depend on
training). Throughput: the same in-memory batches go through (a) ``sae.encode`` only and (b)
``analyze.run.latents`` + ``FeatureStats.update`` (what ``lake analyze`` does per batch); best
of --repeats. RSS: ``lake analyze`` end to end (model load, stream, logits, neighbours, write
the embedded store) in a fresh subprocess per token count; VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# this script is bench/analyze.py: keep bench/ off the path so `import analyze`/`train` find the packages
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

HOOK, RUN, SAE = "blocks.3.hook_resid_post", "b2d", "bench-topk"


def setup(lake: str, tokens: int, arch: str) -> str:
    from saelake.lake import IngestConfig, Lake, ingest
    from saelake.train import dictionaries
    from saelake.train.store import SAEStore

    if RUN not in Lake(lake).run_names():
        ingest(
            IngestConfig(
                lake=lake,
                model="smollm2-135m",
                dataset="builtin",
                hooks=[HOOK],
                tokens=tokens,
                context_size=128,
                layouts=["2d"],
                run=RUN,
            ),
            progress=False,
        )
    name = f"bench-{arch}"
    if not SAEStore(lake).exists(name):
        d, S = 576, 8 * 576
        sae = dictionaries.get(arch).build(d, S, k=32 if arch == "topk" else None)
        sae.initialize([torch.Generator().manual_seed(0)], dec_norm=1.0)
        if arch == "relu":
            with torch.no_grad():
                sae.b_enc.fill_(-7.25)  # L0 about 60 on these raw activations, like a trained ReLU SAE
        SAEStore(lake).save(
            {
                "name": name,
                "arch": arch,
                "hook": HOOK,
                "hooks": [HOOK],
                "out_hook": HOOK,
                "out_hooks": [HOOK],
                "d_in": d,
                "d_sae": S,
                "k": 32 if arch == "topk" else None,
                "run": RUN,
                "version": 1,
                "model": "smollm2-135m",
                "status": "complete",
                "apply_b_dec_to_input": True,
            },
            sae.member_state(0),
            metrics=[{"step": 0, "tokens": 0, "name": "init", "value": 0.0}],
        )
    return name


def throughput(lake: str, sae_name: str, tokens: int, batch_size: int, repeats: int) -> dict:
    from saelake.analyze.run import latents
    from saelake.analyze.stats import FeatureStats
    from saelake.lake import SnapshotSource
    from saelake.train.store import SAEStore

    sae, _ = SAEStore(lake).load(sae_name)
    src = SnapshotSource(lake, RUN)
    batches = []
    for b in src.context_batches(batch_size, [HOOK]):
        batches.append((b.acts[HOOK].clone(), b.tokens.clone(), b.context_id.clone(), b.doc_id.clone()))
        if sum(len(x[1]) for x in batches) * src.context_size >= tokens:
            break
    n_tok = sum(x[0].shape[0] * x[0].shape[1] for x in batches)
    skip = torch.tensor([1, 2], dtype=torch.int32)  # SmolLM2 BOS, pad

    def encode_only():
        for acts, *_ in batches:
            sae.encode(acts.reshape(-1, acts.shape[-1]).float())

    def analysis():
        st = FeatureStats(sae.d_sae, src.context_size)
        for acts, toks, cid, did in batches:
            valid = ~torch.isin(toks, skip)
            rows, lat, vals = latents(sae, acts.reshape(-1, acts.shape[-1]).float(), valid.reshape(-1))
            st.update(rows, lat, vals, toks, valid, cid, did)

    out = {}
    with torch.no_grad():
        for name, fn in (("encoder_only", encode_only), ("analysis", analysis)):
            best = min(_timed(fn) for _ in range(repeats))
            out[name] = n_tok / best
    out["ratio"] = out["analysis"] / out["encoder_only"]
    out["tokens"] = n_tok
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def child(lake: str, sae_name: str, tokens: int) -> None:
    """One full `lake analyze`, then print peak RSS."""
    from saelake.analyze.run import AnalyzeConfig, analyze

    rec = analyze(
        AnalyzeConfig(lake=lake, sae=sae_name, tokens=tokens, name=f"rss-{tokens}", overwrite=True), progress=False
    )
    # VmHWM, not ru_maxrss: a child exec'd from this bench process can report its parent's peak
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(
        json.dumps(
            {
                "tokens": rec.tokens_total,
                "peak_rss_mb": peak_kb / 1024,
                "seconds": rec.seconds,
                "tokens_per_second": rec.tokens_per_second,
            }
        )
    )


def from_index(lake: str, sae_name: str) -> dict:
    """Seconds for `lake analyze` encoding the whole snapshot, for `lake encode` (the latent index),
    and for `lake analyze --from-index` reading that index instead of encoding (issue 13)."""
    from saelake.analyze.latent_index import encode
    from saelake.analyze.run import AnalyzeConfig, analyze

    index = f"{sae_name}-index-{time.time_ns()}"
    out = {
        "analyze_encoding_s": _timed(
            lambda: analyze(AnalyzeConfig(lake=lake, sae=sae_name, name="fi-encoding", overwrite=True), progress=False)
        ),
        "encode_index_s": _timed(lambda: encode(lake, sae_name, name=index, progress=False)),
    }
    rec = json.loads((Path(lake) / "indexes" / index / "index.json").read_text())
    files = [f for f in (Path(lake) / "indexes" / index).rglob("*") if f.is_file() and "/data/" in str(f)]
    out["index_tokens"] = rec["tokens"]
    out["index_bytes_per_token"] = sum(f.stat().st_size for f in files) / max(1, rec["tokens"])
    out["analyze_from_index_s"] = _timed(
        lambda: analyze(
            AnalyzeConfig(lake=lake, sae=sae_name, name="fi-index", from_index=index, overwrite=True), progress=False
        )
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lake", default="/tmp/saelake-bench")
    p.add_argument("--tokens", type=int, default=24576, help="snapshot size (and the larger RSS run)")
    p.add_argument("--small", type=int, default=6144, help="the smaller RSS run")
    p.add_argument("--throughput-tokens", type=int, default=24576)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--arch", default="topk", choices=["topk", "relu"])
    p.add_argument("--from-index", action="store_true", help="also time `lake analyze --from-index` (issue 13)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = f"bench-{a.arch}"
    if a.child:
        return child(a.lake, name, a.child)
    setup(a.lake, a.tokens, a.arch)
    if a.from_index:
        fi = from_index(a.lake, name)
        print(
            f"whole snapshot ({a.tokens} tokens): lake analyze (encoding) {fi['analyze_encoding_s']:.1f} s; "
            f"lake encode (index) {fi['encode_index_s']:.1f} s, then lake analyze --from-index "
            f"{fi['analyze_from_index_s']:.1f} s; the index: {fi['index_bytes_per_token']:.0f} bytes per token "
            f"({fi['index_tokens']} tokens)"
        )
    tp = throughput(a.lake, name, a.throughput_tokens, a.batch_size, a.repeats)
    print(
        f"{a.arch} SAE d_sae 4608 on d_model 576, {tp['tokens']} tokens in batches of {a.batch_size} contexts x 128, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  encoder only   {tp['encoder_only']:9.0f} tok/s")
    print(f"  analysis       {tp['analysis']:9.0f} tok/s   ratio {tp['ratio']:.2f}")
    for n in (a.small, a.tokens):
        r = subprocess.run(
            [sys.executable, __file__, "--lake", a.lake, "--arch", a.arch, "--child", str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(
            f"  lake analyze {res['tokens']:6d} tokens: peak RSS {res['peak_rss_mb']:7.0f} MB, "
            f"stream {res['tokens_per_second']:.0f} tok/s"
        )


if __name__ == "__main__":
    main()
