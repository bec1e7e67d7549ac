"""``lake ingest``: run a model over a corpus and write 1d + 2d activations to the lake.

The corpus is packed into contexts deterministically, so context ``i`` is the same
context on every run. Contexts are processed in chunks of ``shuffle_buffer`` tokens;
each chunk is one Lance commit per table (1d rows shuffled inside the chunk with a
generator seeded by ``(seed, first context of the chunk)``) and the commit records how
many contexts are done. A crash loses at most the chunk in flight, and ``--resume``
recomputes exactly that chunk, so the final table equals an uninterrupted run's.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import lance
import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from .corpus import check_corpus, documents, pack_contexts
from .errors import UserError
from .lake import TABLES, Lake
from .models import LoadedModel, load_model
from .storage import check_name
from .tables import DTYPES, acts_field, acts_to_arrow, column_name

# Settings that define a run: --resume and --append must repeat them exactly.
IDENTITY = ("model", "dataset", "text_column", "hooks", "context_size", "dtype", "layouts", "seed",
            "shuffle_buffer", "keep_bos")


@dataclass
class IngestConfig:
    lake: str
    hooks: list[str]
    tokens: int
    model: str = "smollm2-135m"
    dataset: str = "builtin"
    text_column: str = "text"
    context_size: int = 128
    layouts: list[str] = field(default_factory=lambda: ["1d", "2d"])
    dtype: str = "float16"
    run: str | None = None
    batch_size: int = 16  # contexts per forward pass
    seed: int = 0
    shuffle_buffer: int = 32768  # tokens per chunk: the 1d shuffle window and the commit unit
    keep_bos: bool = False  # keep BOS positions in the 1d table and its statistics
    resume: bool = False
    append: bool = False
    device: str = "cpu"

    def validate(self) -> None:
        if not self.hooks or any(not h.strip() for h in self.hooks):
            raise UserError("--hooks is empty: give comma-separated hook names like blocks.3.hook_resid_post")
        if len(set(self.hooks)) != len(self.hooks):
            raise UserError(f"--hooks lists a hook twice: {','.join(self.hooks)}")
        if self.tokens <= 0:
            raise UserError(f"--tokens must be positive, got {self.tokens}")
        if self.context_size < 2:
            raise UserError(f"--context-size must be at least 2 (BOS + one token), got {self.context_size}")
        if self.batch_size <= 0 or self.shuffle_buffer <= 0:
            raise UserError("--batch-size and --shuffle-buffer must be positive")
        if self.dtype not in DTYPES:
            raise UserError(f"unsupported dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        bad = [x for x in self.layouts if x not in TABLES]
        if bad or not self.layouts:
            raise UserError(f"unknown layout {','.join(bad) or '(none)'}: use --layout 1d, 2d or 1d,2d")
        if self.resume and self.append:
            raise UserError("--resume and --append are exclusive: resume finishes a run, append extends a complete one")
        if self.run is None:
            self.run = "run-" + datetime.now().strftime("%Y%m%d-%H%M%S")
        check_name(self.run, "run name")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _committed_contexts(ds: lance.LanceDataset | None) -> int:
    """How many contexts the latest commit of a table covers (0 if there is no table)."""
    if ds is None:
        return 0
    txn = ds.read_transaction(ds.version)
    return int(txn.transaction_properties.get("contexts_done", 0)) if txn else 0


def _open(lake: Lake, run: str, table: str) -> lance.LanceDataset | None:
    if not lake.storage.exists("runs", run, f"{table}.lance"):
        return None
    return lake.dataset(run, table)


def _new_manifest(cfg: IngestConfig, model: LoadedModel) -> dict:
    m = {k: getattr(cfg, k) for k in IDENTITY}
    m |= {
        "name": cfg.run, "status": "running", "created": _now(), "updated": _now(), "error": None,
        "model_info": {"n_layers": model.n_layers, "d_model": model.d_model, "n_ctx": model.n_ctx,
                       "d_vocab": model.d_vocab, "bos_token_id": model.bos_token_id},
        "columns": {h: column_name(h) for h in cfg.hooks},
        "d_model": {h: model.d_model for h in cfg.hooks},
        "tables": [TABLES[x] for x in cfg.layouts],
        "contexts": 0, "tokens": 0, "rows_1d": 0, "contexts_target": 0, "segment_start": 0,
        "versions": [], "stats": {},
    }
    return m


def _prepare(cfg: IngestConfig, lake: Lake) -> dict | None:
    """Check run-name rules before loading anything; returns the existing manifest if any."""
    exists = lake.storage.exists("runs", cfg.run, "manifest.json")
    if exists and not (cfg.resume or cfg.append):
        raise UserError(f"run {cfg.run!r} already exists in {lake.root}: pass --resume to finish it, "
                        "--append to extend it, or choose another --run")
    if not exists and (cfg.resume or cfg.append):
        raise UserError(f"cannot {'resume' if cfg.resume else 'append to'} run {cfg.run!r}: it does not "
                        f"exist in {lake.root}")
    if not exists:
        return None
    m = lake.manifest(cfg.run)
    diff = [k for k in IDENTITY if m.get(k) != getattr(cfg, k)]
    if diff:
        k = diff[0]
        raise UserError(f"run {cfg.run!r} was made with {k}={m.get(k)!r}, not {getattr(cfg, k)!r}: repeat "
                        "the original settings (see `lake show`)")
    if cfg.append and m["status"] != "complete":
        raise UserError(f"run {cfg.run!r} is {m['status']}, not complete: finish it with --resume first")
    return m


def _chunk_tables(cfg: IngestConfig, model: LoadedModel, ctxs, bos: int) -> dict[str, pa.Table]:
    """Forward a chunk of contexts and build its 1d and 2d Arrow tables."""
    tokens = torch.from_numpy(np.stack([c.tokens for c in ctxs]))  # [n, T]
    acts = {h: [] for h in cfg.hooks}
    for i in range(0, len(ctxs), cfg.batch_size):
        out = model.activations(tokens[i:i + cfg.batch_size].to(cfg.device), cfg.hooks)
        for h in cfg.hooks:
            acts[h].append(out[h].float().cpu())
    acts = {h: torch.cat(v) for h, v in acts.items()}  # [n, T, d] float32
    n, T = tokens.shape
    ctx_ids = np.array([c.context_id for c in ctxs], np.int64)
    out: dict[str, pa.Table] = {}
    if "2d" in cfg.layouts:
        cols = {"context_id": pa.array(ctx_ids), "doc_id": pa.array([c.doc_id for c in ctxs], pa.int64()),
                "doc_offset": pa.array([c.offset for c in ctxs], pa.int32()),
                "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.numpy().ravel()), T)}
        fields = [pa.field(k, v.type) for k, v in cols.items()]
        for h in cfg.hooks:
            col, d = column_name(h), acts[h].shape[-1]
            cols[col] = acts_to_arrow(acts[h], cfg.dtype)
            cols[col + "_norm"] = pa.FixedSizeListArray.from_arrays(
                pa.array(acts[h].norm(dim=-1).numpy().ravel()), T)
            fields += [acts_field(col, cfg.dtype, (T, d)), pa.field(col + "_norm", pa.list_(pa.float32(), T))]
        out["contexts"] = pa.Table.from_arrays(list(cols.values()), schema=pa.schema(fields))
    if "1d" in cfg.layouts:
        flat_tokens = tokens.reshape(-1)
        keep = torch.ones_like(flat_tokens, dtype=torch.bool) if cfg.keep_bos else flat_tokens != bos
        rng = np.random.default_rng([cfg.seed, int(ctx_ids[0])])
        idx = torch.from_numpy(rng.permutation(int(keep.sum())))
        rows = keep.nonzero().squeeze(1)[idx]  # shuffled flat (context, position) indices
        cols = {"token_id": pa.array(flat_tokens[rows].numpy()),
                "context_id": pa.array(ctx_ids[(rows // T).numpy()]),
                "position": pa.array((rows % T).to(torch.int32).numpy())}
        fields = [pa.field(k, v.type) for k, v in cols.items()]
        for h in cfg.hooks:
            col = column_name(h)
            x = acts[h].reshape(n * T, -1)[rows]
            cols[col] = acts_to_arrow(x, cfg.dtype)
            cols[col + "_norm"] = pa.array(x.norm(dim=-1).numpy())
            fields += [acts_field(col, cfg.dtype, (x.shape[1],)), pa.field(col + "_norm", pa.float32())]
        out["tokens"] = pa.Table.from_arrays(list(cols.values()), schema=pa.schema(fields))
    return out


def _stats(lake: Lake, m: dict) -> dict:
    """Per-hook norm statistics over the whole run (non-BOS tokens unless keep_bos)."""
    stats = {}
    bos = m["model_info"]["bos_token_id"]
    for h in m["hooks"]:
        col = m["columns"][h] + "_norm"
        if "tokens" in m["tables"]:
            norms = lake.dataset(m["name"], "tokens").to_table(columns=[col]).column(col).to_numpy()
        else:
            t = lake.dataset(m["name"], "contexts").to_table(columns=["tokens", col])
            norms = t.column(col).combine_chunks().flatten().to_numpy()
            if not m["keep_bos"]:
                norms = norms[t.column("tokens").combine_chunks().flatten().to_numpy() != bos]
        norms = norms.astype(np.float64)
        q = np.quantile(norms, [0.01, 0.05, 0.5, 0.95, 0.99, 0.999]) if len(norms) else [0.0] * 6
        stats[h] = {"n": int(len(norms)), "mean_norm": float(norms.mean()), "rms_norm": float(np.sqrt((norms ** 2).mean())),
                    "p01_norm": q[0], "p05_norm": q[1], "median_norm": q[2], "p95_norm": q[3], "p99_norm": q[4],
                    "p999_norm": q[5], "max_norm": float(norms.max()),
                    "frac_over_10x_median": float((norms > 10 * q[2]).mean())}
    return stats


def ingest(cfg: IngestConfig, progress: bool = True) -> dict:
    """Run an ingest (new, --resume or --append). Returns the final run manifest."""
    cfg.validate()
    lake = Lake(cfg.lake)
    existing = _prepare(cfg, lake)
    if cfg.resume and existing and existing["status"] == "complete":
        print(f"run {cfg.run} is already complete ({existing['tokens']} tokens): nothing to do")
        return existing
    check_corpus(cfg.dataset, cfg.text_column)
    model = load_model(cfg.model, cfg.device)
    model.check_hooks(cfg.hooks)
    if cfg.context_size > model.n_ctx:
        raise UserError(f"--context-size {cfg.context_size} is larger than {cfg.model}'s context of "
                        f"{model.n_ctx} tokens")
    new_contexts = math.ceil(cfg.tokens / cfg.context_size)
    if existing is None:
        m = _new_manifest(cfg, model)
        m["contexts_target"] = new_contexts
        import json
        if not lake.storage.create_exclusive(json.dumps(m, indent=2).encode(), "runs", cfg.run, "manifest.json"):
            raise UserError(f"run {cfg.run!r} was just created by another ingest: choose another --run")
    else:
        m = existing
        if cfg.append:
            m["segment_start"] = m["contexts"]
            m["contexts_target"] = m["contexts"] + new_contexts
        elif m["contexts_target"] != m["segment_start"] + new_contexts and not m["versions"]:
            raise UserError(f"run {cfg.run!r} was started with --tokens for {m['contexts_target']} contexts, "
                            f"not {new_contexts}: repeat the original --tokens")
        m["status"], m["error"], m["updated"] = "running", None, _now()
        lake.write_manifest(m)
    try:
        _write_chunks(cfg, lake, model, m, progress)
        return _finish(lake, m)
    except BaseException as e:  # Ctrl-C included: the run is resumable, and says it failed
        m["status"], m["updated"] = "failed", _now()
        m["error"] = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"[:500]
        try:
            lake.write_manifest(m)
            lake.register_run(m)
        except Exception:
            pass
        raise


def _write_chunks(cfg: IngestConfig, lake: Lake, model: LoadedModel, m: dict, progress: bool) -> None:
    tables = m["tables"]
    done = {t: _committed_contexts(_open(lake, cfg.run, t)) for t in tables}
    base, target, T = m["segment_start"], m["contexts_target"], cfg.context_size
    start = min(done.values())
    per_chunk = max(1, cfg.shuffle_buffer // T)
    contexts = pack_contexts(documents(cfg.dataset, cfg.text_column), model.tokenizer, T, model.bos_token_id)
    contexts = itertools.islice(contexts, start, target)  # skip what is committed everywhere
    bar = tqdm(total=(target - base) * T, initial=(start - base) * T, unit="tok", unit_scale=True,
               desc=f"ingest {cfg.run}", disable=not progress, smoothing=0.1)
    pos = start
    while pos < target:
        # chunk boundaries are fixed by the segment start, so a resumed run cuts the same chunks
        end = min(base + ((pos - base) // per_chunk + 1) * per_chunk, target)
        chunk = list(itertools.islice(contexts, end - pos))
        if not chunk:
            tqdm.write(f"corpus {cfg.dataset} ran out after {pos} contexts ({pos * T} tokens); stopping there")
            m["contexts_target"] = target = pos
            break
        end = pos + len(chunk)
        built = _chunk_tables(cfg, model, chunk, model.bos_token_id)
        for table, data in built.items():
            if done[table] >= end:
                continue  # this table committed the chunk before a crash; the other did not
            lance.write_dataset(data, lake.table_uri(cfg.run, table), mode="append" if done[table] else "create",
                                storage_options=lake.storage.storage_options, max_rows_per_file=1 << 24,
                                transaction_properties={"contexts_done": str(end)})
            done[table] = end
        pos = end
        bar.update(len(chunk) * T)
    bar.close()


def _finish(lake: Lake, m: dict) -> dict:
    run, versions, rows = m["name"], {}, {}
    for table in m["tables"]:
        ds = lake.dataset(run, table)
        versions[table], rows[table] = ds.version, ds.count_rows()
        tag = f"complete-{len(m['versions']) + 1}"
        if tag not in ds.tags.list():
            ds.tags.create(tag, ds.version)
    m["contexts"] = m["contexts_target"]
    m["tokens"] = m["contexts"] * m["context_size"]
    m["rows_1d"] = rows.get("tokens", 0)
    m["versions"].append({"tables": versions, "rows": rows, "contexts": m["contexts"], "tokens": m["tokens"],
                          "tag": f"complete-{len(m['versions']) + 1}", "created": _now()})
    m["stats"] = _stats(lake, m)
    m["status"], m["updated"] = "complete", _now()
    lake.write_manifest(m)
    lake.register_run(m)
    return m
