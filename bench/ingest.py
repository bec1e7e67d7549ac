"""Ingest benchmark: how much does `lake ingest` cost on top of the model's forward pass?

On the bundled model and corpus (defaults) it measures, per hook set:

  (a) bare      LoadedModel.activations (the lake's own model-loading path: TransformerLens 4
                TransformerBridge, stopped after the hook layer) over the same packed contexts,
                outputs discarded. Contexts are tokenized before the clock starts.
  (b) ingest    lake.ingest(IngestConfig(...), progress=False) in this process, the whole call
                timed (model boot, corpus tokenization, forward, Arrow tables, Lance commits,
                stats, catalog), after the model cache is warm. A per-stage breakdown is
                collected by wrapping lake.ingest's internals (no code in lake/ is changed).
  (c) raw HF    transformers.AutoModelForCausalLM.from_pretrained(<model cache dir>) with its
                decoder-layer list truncated to the same number of layers, base model only
                (embedding + N layers + final norm, no lm_head), no hooks; once with the
                default attention implementation and once with "eager" (what the bridge uses).

The machine may be shared, so ratios are measured paired: (a), (c) and (c eager) alternate
batch by batch over the same contexts; and during each (b) ingest every batch the ingest
forwards is forwarded once more by a bare call next to it (timed apart, excluded from (b)),
giving (b)/(a) under the same load at the same moment. Repeats are interleaved; ratios are medians.

It prints tokens/s for each, (b)/(a) (the lake's own overhead; target >= 0.9), (a)/(c) (the
hook framework's), bytes per token on disk, and the peak RSS of ingests of --rss-tokens
tokens, each in a fresh subprocess: the whole process's peak, and the ingest's own peak after
the model boot (VmHWM reset via /proc/self/clear_refs); target: largest within 10% of smallest.

    python bench/ingest.py                       # real sizes (several minutes on 2 cores)
    python bench/ingest.py --write               # ... and update the "## ingest" section of bench/RESULTS.md
    python bench/ingest.py --model PATH --dataset FILE --hooks blocks.0.hook_resid_post \
        --tokens 2000 --rss-tokens 1000,4000 --context-size 32    # tiny smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import itertools
import json
import math
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAGE = os.sysconf("SC_PAGE_SIZE")
CHILD_TAG = "BENCH_CHILD "


# -- small helpers ---------------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def vm_kb(key: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM = peak RSS since start or the last reset)."""
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to /proc/self/clear_refs), so later peaks exclude what came before."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def du_bytes(path: Path) -> int:
    """Allocated bytes (what `du -s` reports), as opposed to dir_bytes' apparent size."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def busy_processes(n: int = 5) -> list[str]:
    try:
        out = subprocess.run(
            ["ps", "-eo", "pcpu,pid,etime,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
    except Exception:
        return []
    me = str(os.getpid())
    rows = [r.strip()[:140] for r in out[1:] if r.split()[1] != me and not r.split(None, 3)[3].startswith("ps ")]
    return rows[:n]


class Stages:
    """Wrap lake.ingest's internals with timers (restored on exit); lake/ itself is untouched."""

    def __init__(self, reset_peak: bool = False, paired: bool = False):
        self.t = defaultdict(float)
        self.rss_after_load = None
        self.reset_peak = reset_peak  # child processes: measure the ingest's peak apart from the model boot's
        self.peak_boot_kb = None
        self.peak_reset = False
        self.in_chunk = False
        self.paired = paired  # a bare forward of each batch next to the ingest's own (timed apart, excluded from (b))
        self.paired_tokens = 0
        self.n_batches = 0

    def _timed(self, name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[name] += time.perf_counter() - t0

        return wrapper

    # (attribute of lake.ingest, stage): whichever exist are wrapped, so the bench follows refactors of lake/
    # Since the writer thread, forward_chunk (the forward plus copies into the chunk buffers) runs on the
    # main thread and chunk_table + write_chunk_fragments on the writer thread, overlapping the next forward.
    WRAP = [
        ("check_corpus", "check_corpus"),
        ("_chunk_tables", "chunk_tables"),
        ("chunk_tables", "chunk_tables"),
        ("forward_chunk", "chunk_tables"),
        ("chunk_table", "build_tables_bg"),
        ("write_chunk_fragments", "lance_write"),
        ("commit_fragments", "lance_commit"),
        ("_finish", "finish"),
        ("_stats", "stats"),
    ]
    CHUNK = ("forward_chunk", "chunk_tables", "_chunk_tables")  # the attribute whose calls hold the forward

    @contextlib.contextmanager
    def patched(self):
        import lance

        from saelake.lake.models import LoadedModel

        mod = importlib.import_module("saelake.lake.ingest")
        names = ["load_model", "pack_contexts"] + [k for k, _ in self.WRAP]
        saved = {k: getattr(mod, k) for k in names if hasattr(mod, k)}
        missing = {"load_model", "pack_contexts"} - set(saved)
        if missing or not set(self.CHUNK) & set(saved):
            raise RuntimeError(
                f"bench/ingest.py no longer matches lake/ingest.py (missing {sorted(missing)} or "
                "chunk_tables): update Stages.WRAP"
            )
        saved_write, saved_acts = lance.write_dataset, LoadedModel.activations
        stages = self

        def load_model(*a, **k):
            t0 = time.perf_counter()
            m = saved["load_model"](*a, **k)
            stages.t["load_model"] += time.perf_counter() - t0
            stages.rss_after_load = rss_mb()
            if stages.reset_peak:
                stages.peak_boot_kb = vm_kb("VmHWM")
                stages.peak_reset = reset_peak_rss()
            return m

        def pack_contexts(*a, **k):
            gen = saved["pack_contexts"](*a, **k)
            while True:
                t0 = time.perf_counter()
                try:
                    c = next(gen)
                except StopIteration:
                    stages.t["tokenize_pack"] += time.perf_counter() - t0
                    return
                stages.t["tokenize_pack"] += time.perf_counter() - t0
                yield c

        mod.load_model = load_model
        mod.pack_contexts = pack_contexts
        for k, stage in self.WRAP:
            if k in saved:
                setattr(mod, k, self._timed(stage, saved[k]))
        chunk_attr = next(k for k in self.CHUNK if k in saved)
        inner_chunk = getattr(mod, chunk_attr)  # the timed wrapper set just above

        def chunk_tables(*a, **k):  # forward time inside chunk tables, so build_tables excludes exactly it
            stages.in_chunk = True
            try:
                return inner_chunk(*a, **k)
            finally:
                stages.in_chunk = False

        setattr(mod, chunk_attr, chunk_tables)

        def bare(*a, **k):  # the paired (a): the same call on the same batch, output discarded
            t0, c0 = time.perf_counter(), time.process_time()
            saved_acts(*a, **k)
            stages.t["paired_bare"] += time.perf_counter() - t0
            stages.t["paired_bare_cpu"] += time.process_time() - c0
            stages.paired_tokens += a[1].numel()

        def activations(*a, **k):
            paired = stages.paired and stages.in_chunk
            stages.n_batches += paired
            if paired and stages.n_batches % 2:  # alternate which of the pair runs first
                bare(*a, **k)
            t0 = time.perf_counter()
            try:
                return saved_acts(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                stages.t["forward"] += dt
                if stages.in_chunk:
                    stages.t["forward_in_chunks"] += dt
                if paired and not stages.n_batches % 2:
                    bare(*a, **k)

        lance.write_dataset = self._timed("lance_write", saved_write)  # the pre-writer.py ingest wrote this way
        LoadedModel.activations = activations
        try:
            yield self
        finally:
            for k, v in saved.items():
                setattr(mod, k, v)
            lance.write_dataset, LoadedModel.activations = saved_write, saved_acts

    def breakdown(self, total: float) -> dict[str, float]:
        t = dict(self.t)
        background = "build_tables_bg" in t  # table building and fragment writes overlap the forward
        out = {
            "load_model": t.get("load_model", 0.0),
            "check_corpus": t.get("check_corpus", 0.0),
            "tokenize_pack": t.get("tokenize_pack", 0.0),
            "forward": t.get("forward", 0.0),
            "build_tables": t.get("chunk_tables", 0.0) - t.get("forward_in_chunks", 0.0) - t.get("paired_bare", 0.0),
            "lance_write": t.get("lance_write", 0.0) + t.get("lance_commit", 0.0),
            "finish_stats": t.get("stats", 0.0),
            "finish_other": t.get("finish", 0.0) - t.get("stats", 0.0),
        }
        if background:
            out["lance_write"] = t.get("lance_commit", 0.0)  # commits stay on the main thread
            out["other"] = total - sum(out.values())
            out["bg_build_tables"] = t.get("build_tables_bg", 0.0)  # writer thread, not in the sum
            out["bg_lance_write"] = t.get("lance_write", 0.0)
        else:
            out["other"] = total - sum(out.values())
        return {k: round(v, 3) for k, v in out.items()}


# -- the three measurements ------------------------------------------------------------------
def pack(model, dataset: str, text_column: str, tokens: int, T: int):
    import numpy as np
    import torch

    from saelake import lake

    want = math.ceil(tokens / T)
    ctxs = list(
        itertools.islice(
            lake.pack_contexts(lake.documents(dataset, text_column), model.tokenizer, T, model.bos_token_id), want
        )
    )
    return torch.from_numpy(np.stack([c.tokens for c in ctxs])), want


def interleaved(runners: dict, toks, batch: int) -> dict[str, tuple[float, float]]:
    """Time several forwards over the same contexts, alternating batch by batch (order rotated), so a
    change in the machine's other load hits all of them alike. Returns {name: (wall s, CPU s)}."""
    import torch

    names = list(runners)
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    with torch.inference_mode():
        for name in names:  # warm-up (first call allocates / picks kernels)
            runners[name](toks[:batch])
        for j, i in enumerate(range(0, len(toks), batch)):
            x = toks[i : i + batch]
            for name in names[j % len(names) :] + names[: j % len(names)]:
                t0, c0 = time.perf_counter(), time.process_time()
                runners[name](x)
                wall[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
    return {n: (wall[n], cpu[n]) for n in names}


def truncated_hf(path: str, n_layers: int | None, attn: str | None):
    """The raw transformers model, embedding + first n_layers decoder layers (+ final norm), no lm_head."""
    import torch
    from transformers import AutoModelForCausalLM

    kw = {"dtype": torch.float32}
    if attn:
        kw["attn_implementation"] = attn
    hf = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    base = hf.base_model
    total = hf.config.num_hidden_layers
    if n_layers is not None and n_layers < total:
        lists = [
            (name, m) for name, m in base.named_children() if isinstance(m, torch.nn.ModuleList) and len(m) == total
        ]
        if len(lists) != 1:
            raise RuntimeError(f"cannot find the decoder layer list of {type(base).__name__}")
        name, layers = lists[0]
        setattr(base, name, layers[:n_layers])
        hf.config.num_hidden_layers = n_layers
    return base, hf.config._attn_implementation


def run_ingest(
    args,
    hooks: list[str],
    tokens: int,
    lake_dir: Path,
    run: str,
    profile: Path | None = None,
    reset_peak: bool = False,
    paired: bool = False,
) -> dict:
    """One in-process lake.ingest call, timed whole, with the stage breakdown and disk usage."""
    from saelake import lake

    cfg = lake.IngestConfig(
        lake=str(lake_dir),
        hooks=hooks,
        tokens=tokens,
        model=args.model,
        dataset=args.dataset,
        text_column=args.text_column,
        context_size=args.context_size,
        layouts=args.layout.split(","),
        dtype=args.dtype,
        run=run,
        batch_size=args.batch_size,
        seed=0,
    )
    stages = Stages(reset_peak, paired)
    prof = cProfile.Profile() if profile else None
    out = io.StringIO()
    with stages.patched(), contextlib.redirect_stdout(out):
        t0, c0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        m = lake.ingest(cfg, progress=False)
        if prof:
            prof.disable()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    dt -= stages.t.get("paired_bare", 0.0)  # the paired bare forwards are not part of the ingest
    cpu -= stages.t.get("paired_bare_cpu", 0.0)
    if prof:
        prof.dump_stats(profile)
    run_dir = lake_dir / "runs" / run
    tables = {t: dir_bytes(run_dir / f"{t}.lance") for t in m["tables"] if (run_dir / f"{t}.lance").exists()}
    return {
        "seconds": dt,
        "cpu_seconds": cpu,
        "tokens": m["tokens"],
        "requested": tokens,
        "rows_1d": m["rows_1d"],
        "bytes": dir_bytes(run_dir),
        "du_bytes": du_bytes(run_dir),
        "table_bytes": tables,
        "stages": stages.breakdown(dt),
        "printed": out.getvalue().strip(),
        "rss_after_load": stages.rss_after_load,
        "peak_boot_kb": stages.peak_boot_kb,
        "peak_reset": stages.peak_reset,
        "paired_tokens": stages.paired_tokens,
        "paired_seconds": stages.t.get("paired_bare", 0.0),
    }


# -- fresh-process ingests for peak RSS ------------------------------------------------------
def child(args) -> None:
    spec = json.loads(args.child)
    ns = argparse.Namespace(**spec["args"])
    samples = []
    stop = threading.Event()

    def sampler():
        while not stop.wait(0.1):
            samples.append(rss_mb())

    rss_start = rss_mb()
    from saelake import lake  # noqa: F401  (imports count toward the baseline, as they would in `lake ingest`)

    rss_imports = rss_mb()
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    r = run_ingest(ns, spec["hooks"], spec["tokens"], Path(spec["lake"]), spec["run"], reset_peak=True)
    hwm_end = vm_kb("VmHWM")
    stop.set()
    th.join()
    q = lambda p: round(samples[min(len(samples) - 1, int(p * len(samples)))], 1) if samples else None
    boot_kb = r.pop("peak_boot_kb")
    reset = r.pop("peak_reset")
    # The process peak comes from VmHWM, not getrusage: a child forked (vfork + exec) from this bench's big
    # parent inherits the parent's RSS high-water mark into ru_maxrss (Linux keeps the pre-exec mm's peak in
    # signal->maxrss), so ru_maxrss (and RUSAGE_CHILDREN in the parent) would report the parent's peak.
    r |= {
        "maxrss_mb": round(max(boot_kb or 0, hwm_end or 0) / 1024, 1) if hwm_end else round(maxrss_mb(), 1),
        "ru_maxrss_mb": round(maxrss_mb(), 1),
        "peak_boot_mb": round(boot_kb / 1024, 1) if boot_kb else None,
        "peak_after_boot_mb": round(hwm_end / 1024, 1) if reset and hwm_end else None,
        "max_sampled_mb": round(max(samples), 1) if samples else None,
        "rss_start_mb": round(rss_start, 1),
        "rss_imports_mb": round(rss_imports, 1),
        "rss_end_mb": round(rss_mb(), 1),
        "rss_after_load_mb": round(r.pop("rss_after_load") or 0, 1),
        "rss_profile_mb": {f"{int(p * 100)}%": q(p) for p in (0.25, 0.5, 0.75, 0.99)},
    }
    print(CHILD_TAG + json.dumps(r), flush=True)


def fresh_ingest(args, hooks: list[str], tokens: int, lake_dir: Path, run: str) -> dict:
    spec = {"args": vars(args) | {"child": None}, "hooks": hooks, "tokens": tokens, "lake": str(lake_dir), "run": run}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((x for x in p.stdout.splitlines() if x.startswith(CHILD_TAG)), None)
    if p.returncode != 0 or line is None:
        sys.exit(f"fresh-process ingest of {tokens} tokens failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    r = json.loads(line[len(CHILD_TAG) :])
    r["wall_with_python_start"] = wall
    return r


# -- report ------------------------------------------------------------------------------------
def fmt_stages(s: dict) -> str:
    return ", ".join(f"{k} {v:.1f}s" for k, v in s.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="builtin")
    ap.add_argument("--text-column", default="text")
    ap.add_argument(
        "--hooks",
        default="blocks.3.hook_resid_post;blocks.3.hook_resid_post,blocks.3.hook_mlp_out",
        help="hook sets to measure, ';'-separated; each is a comma-separated list (one ingest)",
    )
    ap.add_argument("--tokens", type=int, default=100_000, help="tokens for the throughput runs (a), (b), (c)")
    ap.add_argument(
        "--rss-tokens",
        default="20000,200000",
        help="comma-separated token counts for the fresh-process peak-RSS ingests ('' to skip)",
    )
    ap.add_argument("--rss-hooks", default=None, help="hook set for the RSS ingests (default: the last --hooks set)")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass")
    ap.add_argument("--layout", default="1d,2d")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of (a), (b), (c); the best is reported")
    ap.add_argument("--no-raw", action="store_true", help="skip (c)")
    ap.add_argument(
        "--no-paired",
        action="store_true",
        help="skip the paired (a): a bare forward of each ingest batch, timed next to the ingest's own",
    )
    ap.add_argument(
        "--profile", metavar="FILE", help="cProfile one extra ingest (last hook set) into FILE; print the top"
    )
    ap.add_argument("--workdir", help="where the bench lakes go (default: a temp dir, removed afterwards)")
    ap.add_argument(
        "--write",
        nargs="?",
        const=str(ROOT / "bench" / "RESULTS.md"),
        metavar="RESULTS_MD",
        help="write the '## ingest' section of RESULTS_MD (default bench/RESULTS.md)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch

    from saelake import lake
    from saelake.lake.models import resolve_model

    hook_sets = [[h.strip() for h in s.split(",") if h.strip()] for s in args.hooks.split(";") if s.strip()]
    rss_tokens = [int(x) for x in args.rss_tokens.split(",") if x.strip()]
    rss_hooks = [h.strip() for h in args.rss_hooks.split(",")] if args.rss_hooks else hook_sets[-1]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="saelake-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log = lambda *a: print(*a, flush=True)

    env = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_start": load(),
        "busy_start": busy_processes(),
        "commit": os.environ.get("SAELAKE_COMMIT"),
    }
    with contextlib.suppress(Exception):
        env["commit"] = (
            env["commit"]
            or subprocess.run(
                ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    with contextlib.suppress(Exception):
        env["cpu"] = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    for pkg in ("transformers", "transformer_lens", "pylance", "pyarrow"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            env[pkg] = version(pkg)
    log(
        f"saelake ingest bench: model {args.model}, dataset {args.dataset}, T={args.context_size}, "
        f"batch={args.batch_size}, tokens={args.tokens}, layouts {args.layout}, {args.dtype}; "
        f"{env['cores']} cores, torch threads {env['torch_threads']}, load {env['load_start']}"
    )

    # Warm the model cache (the bundled model converts once) and time a boot from the cache.
    lake.load_model(args.model)
    t0 = time.perf_counter()
    model = lake.load_model(args.model)
    boot = time.perf_counter() - t0
    path, _ = resolve_model(args.model)
    log(f"model boot from cache: {boot:.1f}s ({path})")
    toks, want = pack(model, args.dataset, args.text_column, args.tokens, args.context_size)
    corpus_note = "" if len(toks) == want else f"corpus ran out: {len(toks)} of {want} contexts"
    n_tok = toks.numel()
    log(f"{len(toks)} contexts = {n_tok} tokens packed {corpus_note}")

    results = []
    raw_models: dict[tuple, object] = {}
    for si, hooks in enumerate(hook_sets if args.repeats > 0 else []):
        model.check_hooks(hooks)
        n_layers = model.stop_layer(hooks)
        rec = {
            "hooks": hooks,
            "n_layers": n_layers,
            "a": [],
            "b": [],
            "c": [],
            "c_eager": [],
            "load": [],
            "a_cpu": [],
            "c_cpu": [],
            "c_eager_cpu": [],
        }
        for rep in range(args.repeats):
            rec["load"].append(load())
            runners = {"a": lambda x, hooks=hooks: model.activations(x, hooks)}
            if not args.no_raw:
                for key, attn in (("c", None), ("c_eager", "eager")):
                    if (n_layers, attn) not in raw_models:
                        raw_models[(n_layers, attn)] = truncated_hf(path, n_layers, attn)
                    base, rec[key + "_impl"] = raw_models[(n_layers, attn)]
                    runners[key] = lambda x, base=base: base(input_ids=x.long(), use_cache=False)
            for key, (dt, cpu) in interleaved(runners, toks, args.batch_size).items():
                rec[key].append(n_tok / dt)
                rec[key + "_cpu"].append(n_tok / cpu)
                what = {
                    "a": "bare forward (bridge)",
                    "c": f"raw transformers, {n_layers} layers, attn={rec.get('c_impl')}",
                    "c_eager": f"raw transformers, {n_layers} layers, attn=eager",
                }[key]
                log(
                    f"[{','.join(hooks)}] rep {rep}: ({key}) {what}: {n_tok / dt:,.0f} tok/s ({dt:.1f}s; "
                    f"{n_tok / cpu:,.0f} tok per CPU-s)"
                )
            r = run_ingest(args, hooks, args.tokens, work / f"lake-{si}-{rep}", "bench", paired=not args.no_paired)
            r["tok_s"] = r["tokens"] / r["seconds"]
            steady = r["seconds"] - r["stages"]["load_model"]
            r["tok_s_no_boot"] = r["tokens"] / steady
            r["tok_cpu_s"] = r["tokens"] / r["cpu_seconds"]
            r["forward_share"] = r["stages"]["forward"] / r["seconds"]
            r["paired_a_tok_s"] = r["paired_tokens"] / r["paired_seconds"] if r["paired_seconds"] else None
            r["paired_ratio"] = r["tok_s"] / r["paired_a_tok_s"] if r["paired_a_tok_s"] else None
            paired = (
                f"; paired (a) on the same batches {r['paired_a_tok_s']:,.0f} tok/s -> (b)/(a) paired "
                f"{r['paired_ratio']:.3f}"
                if r["paired_ratio"]
                else ""
            )
            rec["b"].append(r)
            log(
                f"[{','.join(hooks)}] rep {rep}: (b) lake.ingest {r['tok_s']:,.0f} tok/s ({r['seconds']:.1f}s for "
                f"{r['tokens']} tokens; {r['tok_s_no_boot']:,.0f} tok/s without the {r['stages']['load_model']:.1f}s "
                f"model boot; {r['tok_cpu_s']:,.0f} tok per CPU-s; forward is {r['forward_share']:.1%} of the call{paired}) | "
                f"{fmt_stages(r['stages'])}"
            )
            if r["printed"]:
                log(f"    ingest printed: {r['printed']}")
            shutil.rmtree(work / f"lake-{si}-{rep}", ignore_errors=True) if rep else None
            rec["load"][-1] += " -> " + load()
        results.append(rec)
    raw_models.clear()

    if args.profile:  # an extra, unmeasured ingest: cProfile slows what it profiles
        r = run_ingest(args, hook_sets[-1], args.tokens, work / "lake-profile", "bench", Path(args.profile))
        log(f"profiled ingest ({','.join(hook_sets[-1])}): {r['seconds']:.1f}s | {fmt_stages(r['stages'])}")
        s = io.StringIO()
        ps = pstats.Stats(args.profile, stream=s)
        ps.sort_stats("tottime").print_stats(25)
        ps.sort_stats("cumulative").print_stats(40)
        log(s.getvalue())

    rss = []
    for n in rss_tokens:
        env.setdefault("load_rss", []).append(load())
        r = fresh_ingest(args, rss_hooks, n, work / f"rss-{n}", "bench")
        rss.append(r)
        log(
            f"fresh-process ingest of {n} tokens ({','.join(rss_hooks)}): {r['tokens']} tokens in {r['seconds']:.1f}s "
            f"({r['tokens'] / r['seconds']:,.0f} tok/s), peak RSS {r['maxrss_mb']:.0f} MB (until model boot "
            f"{r['peak_boot_mb']} MB, after model boot {r['peak_after_boot_mb']} MB; after imports "
            f"{r['rss_imports_mb']:.0f}, after model boot {r['rss_after_load_mb']:.0f}, at end {r['rss_end_mb']:.0f}; "
            f"over time {r['rss_profile_mb']}) | {fmt_stages(r['stages'])}"
        )
        if r["printed"]:
            log(f"    ingest printed: {r['printed']}")
    env["load_end"] = load()
    env["busy_end"] = busy_processes()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)

    report = render(args, env, boot, n_tok, corpus_note, results, rss, rss_hooks)
    log("\n" + report)
    if args.write:
        write_section(Path(args.write), report)
        log(f"wrote the '## ingest' section of {args.write}")


def render(args, env, boot, n_tok, corpus_note, results, rss, rss_hooks) -> str:
    L = [
        "## ingest",
        "",
        f"`python bench/ingest.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"- Code: saelake `{env.get('commit') or 'unknown commit'}`.",
        f"- Machine: {env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}; python {env['python']}, "
        f"torch {env['torch']}, transformers {env.get('transformers')}, transformer-lens {env.get('transformer_lens')}, "
        f"pylance {env.get('pylance')}, pyarrow {env.get('pyarrow')}.",
        f"- Load average (1/5/15 min) at start {env['load_start']}, at end {env['load_end']}; per measurement below. "
        f"Busiest other processes at start: " + ("; ".join(f"`{b}`" for b in env["busy_start"][:3]) or "none") + ".",
        f"- Model `{args.model}`, corpus `{args.dataset}`, context size {args.context_size}, batch {args.batch_size} "
        f"contexts, layouts {args.layout}, dtype {args.dtype}; {n_tok:,} tokens per throughput run"
        + (f" ({corpus_note})" if corpus_note else "")
        + f". Model boot from the warm cache: {boot:.1f}s.",
        f"- (a) `LoadedModel.activations` (TransformerBridge, stop_at_layer) on pre-tokenized contexts, outputs "
        f"discarded; (b) `lake.ingest(IngestConfig(...), progress=False)` in-process, the whole call timed "
        f"(model boot, tokenization, forward, Arrow, Lance commits, stats, catalog); (c) raw `transformers` base "
        f"model with the decoder-layer list truncated to the same layers, no hooks. {args.repeats} interleaved "
        f"repeats, best shown (all in the log line below each table).",
        "",
    ]
    L += [] if results else ["(no throughput runs: --repeats 0)", ""]
    med = statistics.median
    L += (
        []
        if not results
        else [
            "How the ratios are measured, so that other load on this shared machine cancels out: (a), (c) and (c eager) "
            "run over the same contexts alternating batch by batch (order rotated), so (a)/(c) compares like with like. "
            "**(b)/(a) paired**: during each (b) ingest, each batch the ingest forwards is also forwarded once more by a bare "
            "`LoadedModel.activations` call (before or after the ingest's own, alternating; timed apart and excluded from "
            "(b)'s time), so paired (a) and (b) see the same load at the same moment. **in-run**: the share of the ingest call spent in "
            "`LoadedModel.activations` itself (the rest is the lake's own work). Wall tok/s columns are the best repeat; "
            "ratios are the median over repeats.",
            "",
            "| hooks | layers | (a) bare tok/s | (b) ingest tok/s | (c) raw HF tok/s | (c) raw HF eager tok/s "
            "| **(b)/(a) paired** | (b)/(a) in-run | (a)/(c) | (a)/(c eager) | bytes/token on disk |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    )
    nan = float("nan")
    for r in results:
        a, b = max(r["a"]), max(r["b"], key=lambda x: x["tok_s"])
        c = max(r["c"]) if r["c"] else nan
        ce = max(r["c_eager"]) if r["c_eager"] else nan
        paired = [x["paired_ratio"] for x in r["b"] if x.get("paired_ratio")]
        pr = f"**{med(paired):.2f}**" if paired else "n/a"
        share = med(x["forward_share"] for x in r["b"])
        ac = med(x / y for x, y in zip(r["a"], r["c"])) if r["c"] else nan
        ace = med(x / y for x, y in zip(r["a"], r["c_eager"])) if r["c_eager"] else nan
        tb = ", ".join(f"{k} {v / b['tokens']:,.0f}" for k, v in b["table_bytes"].items())
        L.append(
            f"| `{','.join(r['hooks'])}` | {r['n_layers']} | {a:,.0f} | {b['tok_s']:,.0f} | {c:,.0f} | {ce:,.0f} "
            f"| {pr} | {share:.2f} | {ac:.2f} | {ace:.2f} "
            f"| {b['bytes'] / b['tokens']:,.0f} ({tb}; du {b['du_bytes'] / b['tokens']:,.0f}) |"
        )
    L.append("")
    for r in results:
        bb = max(r["b"], key=lambda x: x["tok_s"])
        L.append(
            f"- `{','.join(r['hooks'])}`, per repeat: (a) "
            + ", ".join(f"{x:,.0f}" for x in r["a"])
            + "; (c) "
            + ", ".join(f"{x:,.0f}" for x in r["c"])
            + "; (c eager) "
            + ", ".join(f"{x:,.0f}" for x in r["c_eager"])
            + " tok/s; (b) "
            + ", ".join(f"{x['tok_s']:,.0f}" for x in r["b"])
            + " tok/s (without the in-call model boot "
            + ", ".join(f"{x['tok_s_no_boot']:,.0f}" for x in r["b"])
            + "), paired (a) "
            + ", ".join(f"{x['paired_a_tok_s']:,.0f}" for x in r["b"] if x.get("paired_a_tok_s"))
            + " tok/s, (b)/(a) paired "
            + ", ".join(f"{x['paired_ratio']:.3f}" for x in r["b"] if x.get("paired_ratio"))
            + ", in-run "
            + ", ".join(f"{x['forward_share']:.3f}" for x in r["b"])
            + f". Load avg per repeat: {'; '.join(r['load'])}. Stages of the fastest ingest (s): "
            + fmt_stages(bb["stages"])
            + f" (total {bb['seconds']:.1f}s)."
        )
    if rss:
        f = lambda v: f"{v:,.0f}" if v is not None else "n/a"
        L += [
            "",
            f"Peak RSS, each ingest in a fresh subprocess (`{','.join(rss_hooks)}`). *Process peak* is the "
            "whole child's peak (`VmHWM`; not `ru_maxrss`, which a child spawned from this big bench process "
            "inherits from its parent on Linux); the child resets `VmHWM` right after the in-call model "
            "boot (`/proc/self/clear_refs`), so *ingest peak* is the peak of the ingest proper (corpus, forward, "
            "tables, commits, stats), apart from the boot's transient.",
            "",
            "| tokens requested | tokens ingested | seconds | tok/s | process peak MB | peak until model boot "
            "| **ingest peak (after boot)** | RSS after imports | RSS after boot | RSS over time (25/50/75/99%) "
            "| load avg |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r, ld in zip(rss, env.get("load_rss", [])):
            prof = " / ".join(f"{v:.0f}" for v in r["rss_profile_mb"].values() if v is not None)
            L.append(
                f"| {r['requested']:,} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:,.0f} "
                f"| {f(r['maxrss_mb'])} | {f(r.get('peak_boot_mb'))} | **{f(r.get('peak_after_boot_mb'))}** "
                f"| {f(r['rss_imports_mb'])} | {f(r['rss_after_load_mb'])} | {prof} | {ld} |"
            )
        lo, hi = rss[0], rss[-1]
        L += [""]
        if lo.get("peak_after_boot_mb") and hi.get("peak_after_boot_mb"):
            a, b = hi["peak_after_boot_mb"], lo["peak_after_boot_mb"]
            L.append(
                f"Largest vs smallest ingest peak (after boot): {a:,.0f} / {b:,.0f} MB = {a / b:.2f}x (target ≤ 1.10x)."
            )
        L.append(
            f"Largest vs smallest process peak: {hi['maxrss_mb']:,.0f} / {lo['maxrss_mb']:,.0f} MB = "
            f"{hi['maxrss_mb'] / lo['maxrss_mb']:.2f}x (target ≤ 1.10x)."
        )
        for r in rss:
            if r["printed"]:
                L.append(f"- the {r['requested']:,}-token ingest printed: `{r['printed']}`")
    return "\n".join(L) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace (or add) the '## ingest' section, keeping every other section as it is."""
    text = path.read_text() if path.exists() else "# saelake benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, x in enumerate(lines) if x.strip() == "## ingest"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    path.write_text(text)


if __name__ == "__main__":
    main()
