"""``lake ingest``: run a model over a corpus and write 1d + 2d activations to the lake.

The corpus is packed into contexts deterministically, so context ``i`` is the same
context on every run. Contexts are processed in chunks of ``shuffle_buffer`` tokens;
each chunk is one Lance commit per table (1d rows shuffled inside the chunk with a
generator seeded by ``(seed, first context of the chunk)``) and the commit records how
many contexts are done. A crash loses at most the two chunks in flight (one being written,
one in the forward), and ``--resume`` recomputes exactly those, so the final table equals an
uninterrupted run's.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from tqdm import tqdm

from . import checksums
from .codecs import CODECS
from .corpus import check_corpus, documents, pack_contexts
from .errors import UserError
from .hooknames import qualify
from .lake import TABLES, Lake
from .models import LoadedModel, load_model
from .records import HookStats, ModelInfo, RunManifest, Snapshot
from .storage import check_name
from .tables import column_name
from .writer import (
    Chunk,
    Lease,
    chunk_table,
    commit_fragments,
    committed_contexts,
    forward_chunk,
    store_error,
    write_chunk_fragments,
)

# Settings that define a run: --resume and --append must repeat them exactly.
IDENTITY = (
    "model",
    "dataset",
    "text_column",
    "hooks",
    "context_size",
    "dtype",
    "layouts",
    "seed",
    "shuffle_buffer",
    "keep_bos",
)


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
    shuffle_buffer: int = 16384  # tokens per chunk: the write-time 1d shuffle window and the commit unit
    keep_bos: bool = False  # keep BOS positions in the 1d table and its statistics
    resume: bool = False
    append: bool = False
    device: str = "cpu"

    def validate(self) -> None:
        if not self.hooks or any(not h.strip() for h in self.hooks):
            raise UserError("--hooks is empty: give comma-separated hook names like blocks.3.hook_resid_post")
        self.hooks = qualify(self.model, self.hooks)  # {a-b} ranges; model:hook for several models
        if len(set(self.hooks)) != len(self.hooks):
            raise UserError(f"--hooks lists a hook twice: {','.join(self.hooks)}")
        if self.tokens <= 0:
            raise UserError(f"--tokens must be positive, got {self.tokens}")
        if self.context_size < 2:
            raise UserError(f"--context-size must be at least 2 (BOS + one token), got {self.context_size}")
        if self.batch_size <= 0 or self.shuffle_buffer <= 0:
            raise UserError("--batch-size and --shuffle-buffer must be positive")
        if self.dtype not in CODECS:
            raise UserError(f"unsupported dtype {self.dtype!r}: use one of {', '.join(CODECS)}")
        bad = [x for x in self.layouts if x not in TABLES]
        if bad or not self.layouts:
            raise UserError(f"unknown layout {','.join(bad) or '(none)'}: use --layout 1d, 2d or 1d,2d")
        if self.resume and self.append:
            raise UserError("--resume and --append are exclusive: resume finishes a run, append extends a complete one")
        if self.run is None:
            self.run = "run-" + datetime.now().strftime("%Y%m%d-%H%M%S")
        check_name(self.run, "run name")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _new_manifest(cfg: IngestConfig, model: LoadedModel, contexts_target: int) -> RunManifest:
    return RunManifest(
        **{k: getattr(cfg, k) for k in IDENTITY},
        name=cfg.run,
        status="running",
        created=_now(),
        updated=_now(),
        error=None,
        model_info=ModelInfo(
            n_layers=model.n_layers,
            d_model=model.d_model,
            n_ctx=model.n_ctx,
            d_vocab=model.d_vocab,
            bos_token_id=model.bos_token_id,
        ),
        columns={h: column_name(h) for h in cfg.hooks},
        d_model=model.hook_dims(cfg.hooks),
        tables=[TABLES[x] for x in cfg.layouts],
        contexts=0,
        tokens=0,
        rows_1d=0,
        contexts_target=contexts_target,
        segment_start=0,
        versions=[],
        stats={},
        checksums_from=0,
        codecs={h: cfg.dtype for h in cfg.hooks},
    )


def _prepare(cfg: IngestConfig, lake: Lake) -> RunManifest | None:
    """Check run-name rules before loading anything; returns the existing manifest if any."""
    exists = lake.storage.exists("runs", cfg.run, "manifest.json")
    if exists and not (cfg.resume or cfg.append):
        raise UserError(
            f"run {cfg.run!r} already exists in {lake.root}: pass --resume to finish it, "
            "--append to extend it, or choose another --run"
        )
    if not exists and (cfg.resume or cfg.append):
        raise UserError(
            f"cannot {'resume' if cfg.resume else 'append to'} run {cfg.run!r}: it does not exist in {lake.root}"
        )
    if not exists:
        return None
    m = lake.manifest(cfg.run)
    diff = [k for k in IDENTITY if getattr(m, k) != getattr(cfg, k)]
    if diff:
        k = diff[0]
        raise UserError(
            f"run {cfg.run!r} was made with {k}={getattr(m, k)!r}, not {getattr(cfg, k)!r}: repeat "
            "the original settings (see `lake show`)"
        )
    if cfg.append and m.status != "complete":
        raise UserError(f"run {cfg.run!r} is {m.status}, not complete: finish it with --resume first")
    return m


def _stats(lake: Lake, m: RunManifest) -> dict[str, HookStats]:
    """Per-hook norm statistics over the whole run (non-BOS tokens unless keep_bos)."""
    stats = {}
    bos = m.model_info.bos_token_id
    for h in m.hooks:
        col = m.columns[h] + "_norm"
        if "tokens" in m.tables:
            norms = lake.dataset(m.name, "tokens").to_table(columns=[col]).column(col).to_numpy()
        else:
            t = lake.dataset(m.name, "contexts").to_table(columns=["tokens", col])
            norms = t.column(col).combine_chunks().flatten().to_numpy()
            if not m.keep_bos:
                norms = norms[t.column("tokens").combine_chunks().flatten().to_numpy() != bos]
        norms = norms.astype(np.float64)
        q = np.quantile(norms, [0.01, 0.05, 0.5, 0.95, 0.99, 0.999]) if len(norms) else [0.0] * 6
        stats[h] = HookStats(
            n=int(len(norms)),
            mean_norm=float(norms.mean()),
            rms_norm=float(np.sqrt((norms**2).mean())),
            p01_norm=float(q[0]),
            p05_norm=float(q[1]),
            median_norm=float(q[2]),
            p95_norm=float(q[3]),
            p99_norm=float(q[4]),
            p999_norm=float(q[5]),
            max_norm=float(norms.max()),
            frac_over_10x_median=float((norms > 10 * q[2]).mean()),
        )
    return stats


def _dist() -> tuple[int, int]:
    """(rank, world size) under torchrun (gloo on CPU), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _agree(fn, world: int, rank: int):
    """Run fn on rank 0 and hand its result (or its UserError) to every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    if world > 1:
        result, error = _gather((result, error), world)[0]
    if error:
        raise UserError(error)
    return result


def ingest(cfg: IngestConfig, progress: bool = True) -> dict:
    """Run an ingest (new, --resume or --append); under torchrun every rank calls this.

    Returns the final run manifest as its JSON object (``Lake.manifest(run)`` gives the typed one)."""
    cfg.validate()
    rank, world = _dist()
    lake = Lake(cfg.lake)
    existing = _agree(lambda: _prepare(cfg, lake), world, rank)
    if cfg.resume and existing and existing.status == "complete":
        if rank == 0:
            print(f"run {cfg.run} is already complete ({existing.tokens} tokens): nothing to do")
        return existing.to_json()
    check_corpus(cfg.dataset, cfg.text_column)
    model = load_model(cfg.model, cfg.device)
    model.check_hooks(cfg.hooks)
    if cfg.context_size > model.n_ctx:
        raise UserError(
            f"--context-size {cfg.context_size} is larger than {cfg.model}'s context of {model.n_ctx} tokens"
        )
    lease = Lease(lake, cfg.run)
    m = _agree(lambda: _start(cfg, lake, model, existing, lease), world, rank)
    try:
        _write_chunks(cfg, lake, model, m, lease, progress and rank == 0, rank, world)
        if rank == 0:
            m = _finish(lake, m)
        return _gather(m, world)[0].to_json()
    except BaseException as e:  # Ctrl-C included: the run is resumable, and says it failed
        if _is_store_failure(e):
            e = store_error(lake, cfg.run, e)
        if rank == 0:
            m.status, m.updated = "failed", _now()
            m.error = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"[:500]
            try:
                lake.write_manifest(m)
                lake.register_run(m)
            except Exception:
                pass
        if isinstance(e, UserError):
            raise e from None
        raise
    finally:
        if rank == 0:
            try:
                lease.release()
            except Exception:
                pass


def _release_memory() -> None:
    """Hand freed chunk buffers back to the OS (glibc keeps large freed blocks otherwise), so
    memory stays at about two chunks (one written, one forwarded) whatever the run's length."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _is_store_failure(e: BaseException) -> bool:
    """Errors of the object store or filesystem (not bugs): reported in one line, resumable."""
    mod = type(e).__module__ or ""
    return isinstance(e, OSError) or mod.startswith(("botocore", "aiobotocore", "s3fs", "fsspec", "aiohttp"))


def _start(
    cfg: IngestConfig, lake: Lake, model: LoadedModel, existing: RunManifest | None, lease: Lease
) -> RunManifest:
    """Create or reopen the run's manifest and take its lease (rank 0)."""
    new_contexts = math.ceil(cfg.tokens / cfg.context_size)
    if existing is None:
        m = _new_manifest(cfg, model, new_contexts)
        if not lake.storage.create_exclusive(
            json.dumps(m.to_json(), indent=2).encode(), "runs", cfg.run, "manifest.json"
        ):
            raise UserError(f"run {cfg.run!r} was just created by another ingest: choose another --run")
        lease.acquire()
        return m
    lease.acquire()
    m = lake.manifest(cfg.run)  # re-read under the lease
    if m.checksums_from is None:  # a run begun before checksums: they start with this ingest's commits
        m.checksums_from = min(committed_contexts(lake, cfg.run, t)[0] for t in m.tables)
    if cfg.append:
        m.segment_start = m.contexts
        m.contexts_target = m.contexts + new_contexts
    elif m.contexts_target != m.segment_start + new_contexts:
        raise UserError(
            f"run {cfg.run!r} was started with --tokens for {m.contexts_target - m.segment_start} "
            f"contexts, not {new_contexts}: repeat the original --tokens"
        )
    m.status, m.error, m.updated = "running", None, _now()
    lake.write_manifest(m)
    return m


def _write_chunks(
    cfg: IngestConfig,
    lake: Lake,
    model: LoadedModel,
    m: RunManifest,
    lease: Lease,
    progress: bool,
    rank: int,
    world: int,
) -> None:
    """Process chunks in rounds of ``world`` (chunk i of a round on rank i); commit each round."""
    tables = m.tables
    done = {t: committed_contexts(lake, cfg.run, t) for t in tables}
    base, target, T = m.segment_start, m.contexts_target, cfg.context_size
    start = min(c for c, _ in done.values())
    per_chunk = max(1, cfg.shuffle_buffer // T)
    # chunk boundaries are fixed by the segment start, so a resumed run cuts the same chunks
    bounds = [(a, min(a + per_chunk, target)) for a in range(base, target, per_chunk) if a + per_chunk > start]
    if bounds and bounds[0][0] != start:
        raise UserError(
            f"run {cfg.run!r} has {start} contexts committed, not at a chunk boundary: was "
            "--shuffle-buffer changed? repeat the original settings"
        )
    contexts = pack_contexts(documents(cfg.dataset, cfg.text_column), model.tokenizer, T, model.bos_token_id)
    contexts = itertools.islice(contexts, start, target)  # skip what is committed everywhere
    bar = tqdm(
        total=(target - base) * T,
        initial=(start - base) * T,
        unit="tok",
        unit_scale=True,
        desc=f"ingest {cfg.run}",
        disable=not progress,
        smoothing=0.1,
    )
    schemas: dict = {}

    def write(chunk: Chunk) -> dict:
        """Build and write a chunk's tables, one at a time (each freed once written)."""
        built = {}
        for table in tables:
            if done[table][0] < chunk.end:  # else: committed before a crash (the other table was not)
                data = chunk_table(table, cfg, chunk, model.bos_token_id)
                frags = write_chunk_fragments(lake, cfg.run, table, data)
                sums = checksums.fragment_checksums(lake.storage, lake.table_uri(cfg.run, table), frags)
                built[table] = (frags, data.schema, sums)
                del data
        _release_memory()
        return built

    def commit(pending) -> bool:
        """Wait for a round's writes, commit them in one transaction per table; False if the corpus ran out."""
        written, end, n, round_bounds = pending
        results = _gather((end, n, written.result() if written else {}), world)
        round_end = max(e for e, _, _ in results)
        if rank == 0 and round_end:
            for table in tables:
                frags = [f for _, _, bt in results if table in bt for f in bt[table][0]]
                schemas.setdefault(table, next((bt[table][1] for _, _, bt in results if table in bt), None))
                if frags:  # checksums first: no committed data file lacks one
                    sums = {k: v for _, _, bt in results if table in bt for k, v in bt[table][2].items()}
                    checksums.record_commit(lake.storage, cfg.run, table, round_end, sums)
                    done[table] = commit_fragments(lake, cfg.run, table, frags, schemas[table], done[table], round_end)
            lease.renew()
        bar.update(sum(n for r, (_, n, _) in enumerate(results) if r != rank) * T)  # this rank's: per batch
        if round_end < (round_bounds[-1][1] if round_bounds else 0):
            if rank == 0:
                tqdm.write(
                    f"corpus {cfg.dataset} ran out after {round_end} contexts ({round_end * T} tokens); stopping there"
                )
            m.contexts_target = round_end
            return False
        return True

    # The writer thread builds and writes round r's tables while this thread runs round r+1's
    # forward (Lance and torch release the GIL); commits stay in order, one round behind.
    writer = ThreadPoolExecutor(1, thread_name_prefix="saelake-writer")
    pending = None
    try:
        for r in range(0, len(bounds), world):
            round_bounds = bounds[r : r + world]
            mine = None
            for i, (a, b) in enumerate(round_bounds):  # every rank reads the stream; each keeps its chunk
                part = list(itertools.islice(contexts, b - a))
                if i == rank:
                    mine = part
            chunk = forward_chunk(cfg, model, mine, on_batch=lambda n: bar.update(n * T)) if mine else None
            if pending and not commit(pending):
                pending = None
                break
            pending = (
                writer.submit(write, chunk) if chunk else None,
                chunk.end if chunk else 0,
                len(mine or []),
                round_bounds,
            )
            del chunk
        if pending:
            commit(pending)
    finally:
        writer.shutdown(wait=True)  # never leave a write running under a failed or interrupted ingest
    bar.close()


def _finish(lake: Lake, m: RunManifest) -> RunManifest:
    versions, rows = {}, {}
    tag = f"complete-{len(m.versions) + 1}"
    for table in m.tables:
        ds = lake.dataset(m.name, table)
        versions[table], rows[table] = ds.version, ds.count_rows()
        if tag not in ds.tags.list():
            ds.tags.create(tag, ds.version)
        checksums.merge(lake.storage, m.name, table, keep={path for path, _ in checksums.data_files(ds)})
    m.contexts = m.contexts_target
    m.tokens = m.contexts * m.context_size
    m.rows_1d = rows.get("tokens", 0)
    m.versions.append(
        Snapshot(tables=versions, rows=rows, contexts=m.contexts, tokens=m.tokens, tag=tag, created=_now())
    )
    m.stats = _stats(lake, m)
    m.status, m.updated = "complete", _now()
    lake.write_manifest(m)
    lake.register_run(m)
    return m
