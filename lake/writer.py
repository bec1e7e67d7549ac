"""Writing activation chunks: Arrow tables, Lance fragments, commits, the run lease.

A chunk is a run of consecutive contexts (``shuffle_buffer`` tokens). Each rank turns its
chunks into Lance fragments (data files that nothing references yet); rank 0 then commits
one round's fragments in a single Lance transaction that records ``contexts_done``. Until
that commit nothing is visible; after it, everything up to ``contexts_done`` is.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import lance
import numpy as np
import pyarrow as pa
import torch
from lance.fragment import FragmentMetadata, write_fragments

from .codecs import get_codec
from .errors import UserError
from .lake import Lake
from .tables import acts_field, acts_to_arrow, column_name

LEASE_SECONDS = 120  # a writer that has not renewed its lease for this long is presumed dead


@dataclass
class Chunk:
    """A forwarded chunk: its contexts, tokens [n, T], and per hook the activations as stored
    (``Codec.encode``'d: [n, T, width]) and their float32 norms [n, T] (of the unencoded values)."""

    ctxs: list
    tokens: torch.Tensor
    acts: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]
    dims: dict[str, int]  # hook -> d_model (a stored cell may be wider: codes + scales)

    @property
    def end(self) -> int:
        return self.ctxs[-1].context_id + 1


def forward_chunk(cfg, model, ctxs, on_batch: Callable[[int], None] | None = None) -> Chunk:
    """Run the model over a chunk of contexts, batch by batch; ``on_batch(contexts)`` after each."""
    tokens = torch.from_numpy(np.stack([c.tokens for c in ctxs]))  # [n, T]
    n, T = tokens.shape
    # one buffer per hook in the storage format, filled batch by batch: a chunk never holds its
    # float32 activations twice (peak memory ~ the stored chunk, not 5x it)
    codec = get_codec(cfg.dtype)
    acts: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    dims: dict[str, int] = {}
    for i in range(0, n, cfg.batch_size):
        out = model.activations(tokens[i : i + cfg.batch_size].to(cfg.device), cfg.hooks)
        for h in cfg.hooks:
            x = out[h].float().cpu()
            if h not in acts:
                dims[h] = x.shape[-1]
                acts[h] = torch.empty(n, T, codec.width(dims[h]), dtype=codec.storage)
                norms[h] = torch.empty(n, T, dtype=torch.float32)
            acts[h][i : i + len(x)] = codec.encode(x)
            norms[h][i : i + len(x)] = x.norm(dim=-1)
        del out
        if on_batch:
            on_batch(min(cfg.batch_size, n - i))
    return Chunk(ctxs, tokens, acts, norms, dims)


WRITE_ROWS = 8192  # rows per record batch handed to Lance: bounds the memory a write adds


def contexts_table(cfg, chunk: Chunk) -> pa.RecordBatchReader:
    """The 2d table of a chunk: one row per context, in corpus order (zero-copy from the buffers)."""
    ctxs, T = chunk.ctxs, chunk.tokens.shape[1]
    cols = {
        "context_id": pa.array([c.context_id for c in ctxs], pa.int64()),
        "doc_id": pa.array([c.doc_id for c in ctxs], pa.int64()),
        "doc_offset": pa.array([c.offset for c in ctxs], pa.int32()),
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(chunk.tokens.numpy().ravel()), T),
    }
    fields = [pa.field(k, v.type) for k, v in cols.items()]
    for h in cfg.hooks:
        col, d = column_name(h), chunk.dims[h]
        cols[col] = acts_to_arrow(chunk.acts[h])
        cols[col + "_norm"] = pa.FixedSizeListArray.from_arrays(pa.array(chunk.norms[h].numpy().ravel()), T)
        fields += [acts_field(col, cfg.dtype, (T, d)), pa.field(col + "_norm", pa.list_(pa.float32(), T))]
    table = pa.Table.from_arrays(list(cols.values()), schema=pa.schema(fields))
    return table.to_reader(max_chunksize=max(1, WRITE_ROWS // T))


def tokens_table(cfg, chunk: Chunk, bos: int) -> pa.RecordBatchReader:
    """The 1d table of a chunk: one row per (non-BOS) token, shuffled within the chunk.

    Rows are gathered slice by slice as Lance consumes them, so the shuffled copy of the
    chunk never exists whole."""
    n, T = chunk.tokens.shape
    ctx_ids = np.array([c.context_id for c in chunk.ctxs], np.int64)
    flat_tokens = chunk.tokens.reshape(-1)
    keep = torch.ones_like(flat_tokens, dtype=torch.bool) if cfg.keep_bos else flat_tokens != bos
    # the write-time shuffle: seeded by the chunk's first context, so any rank or a resumed run
    # produces the same rows in the same order
    rng = np.random.default_rng([cfg.seed, int(ctx_ids[0])])
    rows = keep.nonzero().squeeze(1)[torch.from_numpy(rng.permutation(int(keep.sum())))]
    fields = [
        pa.field("token_id", pa.from_numpy_dtype(flat_tokens.numpy().dtype)),
        pa.field("context_id", pa.int64()),
        pa.field("position", pa.int32()),
    ]
    for h in cfg.hooks:
        col = column_name(h)
        fields += [acts_field(col, cfg.dtype, (chunk.dims[h],)), pa.field(col + "_norm", pa.float32())]
    schema = pa.schema(fields)

    def batches():
        for i in range(0, len(rows), WRITE_ROWS):
            r = rows[i : i + WRITE_ROWS]
            cols = [
                pa.array(flat_tokens[r].numpy()),
                pa.array(ctx_ids[(r // T).numpy()]),
                pa.array((r % T).to(torch.int32).numpy()),
            ]
            for h in cfg.hooks:
                cols += [
                    acts_to_arrow(chunk.acts[h].reshape(n * T, -1)[r]),
                    pa.array(chunk.norms[h].reshape(-1)[r].numpy()),
                ]
            yield pa.RecordBatch.from_arrays(cols, schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def chunk_table(table: str, cfg, chunk: Chunk, bos: int) -> pa.RecordBatchReader:
    return contexts_table(cfg, chunk) if table == "contexts" else tokens_table(cfg, chunk, bos)


def store_error(lake: Lake, run: str, e: Exception) -> UserError:
    where = lake.storage.endpoint or lake.root
    first = (str(e).splitlines() or [""])[0][:160]
    return UserError(
        f"writing run {run!r} to {where} failed ({type(e).__name__}: {first}); what was committed is "
        "kept: rerun with --resume once the store is reachable"
    )


def committed_contexts(lake: Lake, run: str, table: str) -> tuple[int, int]:
    """(contexts covered by the latest commit, its Lance version); (0, 0) if no table yet."""
    try:
        if not lake.storage.exists("runs", run, f"{table}.lance", "_versions"):  # fragments alone are not a table
            return 0, 0
        ds = lance.dataset(lake.table_uri(run, table), storage_options=lake.storage.storage_options)
        txn = ds.read_transaction(ds.version)
    except Exception as e:
        raise store_error(lake, run, e) from None
    return (int(txn.transaction_properties.get("contexts_done", 0)) if txn else 0), ds.version


def write_chunk_fragments(lake: Lake, run: str, table: str, data: pa.Table | pa.RecordBatchReader) -> list[str]:
    """Write a chunk as uncommitted Lance fragments; returns their metadata as JSON strings."""
    try:
        frags = write_fragments(
            data,
            lake.table_uri(run, table),
            schema=data.schema,
            max_rows_per_file=1 << 24,
            storage_options=lake.storage.storage_options,
        )
    except Exception as e:
        raise store_error(lake, run, e) from None
    return [json.dumps(f.to_json()) for f in frags]


def commit_fragments(
    lake: Lake,
    run: str,
    table: str,
    fragments: list[str],
    schema: pa.Schema,
    expected: tuple[int, int],
    contexts_done: int,
) -> tuple[int, int]:
    """Make fragments visible in one commit, if nobody else committed since ``expected``.

    ``expected`` is (contexts_done, version) as this writer last saw it; a different value
    means another writer is on this run, and committing would duplicate rows.
    """
    uri = lake.table_uri(run, table)
    try:
        now = committed_contexts(lake, run, table)
        if now[0] != expected[0]:
            raise UserError(
                f"run {run!r} was extended by another writer ({table}: {now[0]} contexts committed, "
                f"expected {expected[0]}): stop the other ingest, then --resume"
            )
        frags = [FragmentMetadata.from_json(f) for f in fragments]
        op = lance.LanceOperation.Append(frags) if now[1] else lance.LanceOperation.Overwrite(schema, frags)
        txn = lance.Transaction(
            read_version=now[1], operation=op, transaction_properties={"contexts_done": str(contexts_done)}
        )
        ds = lance.LanceDataset.commit(uri, txn, storage_options=lake.storage.storage_options)
    except UserError:
        raise
    except Exception as e:
        raise store_error(lake, run, e) from None
    return contexts_done, ds.version


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return True


class Lease:
    """One writer per run: ``runs/<run>/lease.json`` names the writer and is renewed per chunk.

    Another writer is refused while the lease is fresh and (on this host) its process lives;
    a SIGKILLed writer's lease is ignored at once on the same host, after LEASE_SECONDS elsewhere.
    """

    def __init__(self, lake: Lake, run: str):
        self.lake, self.run = lake, run
        self.me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}

    def _holder(self) -> dict | None:
        held = self.lake.storage.read_json("runs", self.run, "lease.json")
        if not held or held.get("owner") == self.me["owner"]:
            return None
        if held["host"] == self.me["host"] and (held["pid"] == os.getpid() or not _alive(held["pid"])):
            return None  # this process's own stale lease, or a writer that died without releasing
        return held if time.time() - held["renewed"] < LEASE_SECONDS else None

    def acquire(self) -> None:
        held = self._holder()
        if held:
            raise UserError(
                f"run {self.run!r} is being written by pid {held['pid']} on {held['host']}: wait for it "
                "to finish (or stop it) before --resume/--append"
            )
        self.renew()

    def renew(self) -> None:
        self.lake.storage.write_json(self.me | {"renewed": time.time()}, "runs", self.run, "lease.json")

    def release(self) -> None:
        held = self.lake.storage.read_json("runs", self.run, "lease.json")
        if held and held.get("owner") == self.me["owner"]:
            self.lake.storage.remove("runs", self.run, "lease.json")
