"""The shared reader interface: the only way train/ and analyze/ touch activations.

``SnapshotSource`` reads a pinned version of a run's Lance tables; ``LiveSource`` runs the
model. Both serve the same ``TokenBatch`` (1d, shuffled tokens) and ``ContextBatch`` (2d,
whole contexts in order). Activations come decoded: float16/bfloat16/float32 runs in their
storage dtype (zero-copy from Arrow where possible), int8/float8 runs as float32 (codes never
leave the reader without their scales); callers cast to float32 for compute.
"""

from __future__ import annotations

import atexit
import queue
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from .codecs import get_codec
from .errors import UserError
from .lake import Lake
from .tables import arrow_to_acts, arrow_to_stored


@dataclass
class TokenBatch:
    acts: dict[str, torch.Tensor]  # hook -> [n, d]
    token_id: torch.Tensor  # [n] int32
    context_id: torch.Tensor  # [n] int64
    position: torch.Tensor  # [n] int32

    def __len__(self) -> int:
        return len(self.token_id)


@dataclass
class ContextBatch:
    acts: dict[str, torch.Tensor]  # hook -> [n, T, d]
    tokens: torch.Tensor  # [n, T] int32
    context_id: torch.Tensor  # [n] int64
    doc_id: torch.Tensor  # [n] int64

    def __len__(self) -> int:
        return len(self.context_id)


class ActivationSource(Protocol):
    hooks: Sequence[str]
    d_model: Mapping[str, int]

    def token_batches(
        self,
        batch_size: int,
        hooks: Sequence[str] | None = None,
        *,
        seed: int = 0,
        start: int = 0,
        repeat: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[TokenBatch]: ...

    def context_batches(
        self, batch_size: int, hooks: Sequence[str] | None = None, *, start: int = 0
    ) -> Iterator[ContextBatch]: ...

    def state(self) -> dict: ...


_running: set[tuple[threading.Event, threading.Thread]] = set()


@atexit.register
def _stop_prefetchers():
    # A daemon thread still inside native Lance code when the interpreter tears down aborts
    # the process (SIGABRT), so stop every worker a consumer left unfinished and wait for it.
    for stop, worker in list(_running):
        stop.set()
        worker.join()


def _prefetch(gen: Iterator, depth: int = 2) -> Iterator:
    """Run a generator in a background thread (Lance I/O and decoding release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False  # the consumer went away

    def work():
        try:
            for item in gen:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # hand errors to the consumer
            put(e)

    worker = threading.Thread(target=work, daemon=True)
    _running.add((stop, worker))
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
        _running.discard((stop, worker))


class SnapshotSource:
    """A pinned snapshot ``(run, version)`` of a run in a lake.

    ``version`` is the run's snapshot number (1 = the first complete ingest, 2 = after the
    first --append, ...; default: the latest). Reading never sees later appends.
    """

    def __init__(self, lake: Lake | str, run: str, version: int | None = None, block_rows: int = 65536):
        self.lake = lake if isinstance(lake, Lake) else Lake(lake)
        self.manifest = m = self.lake.manifest(run)
        version = len(m.versions) if version is None else version
        self.run, self.version, self.snapshot = run, version, m.snapshot(version)
        self.hooks = list(m.hooks)
        self.d_model = dict(m.d_model)
        self.columns = dict(m.columns)
        self.dtype, self.context_size = m.dtype, m.context_size
        self.codecs = {h: m.codec(h) for h in self.hooks}  # decoded inside the reader: callers get floats
        self._hook_of = {c: h for h, c in self.columns.items()}
        self.block_rows = block_rows
        self._pos: dict = {}

    def __repr__(self) -> str:
        return f"SnapshotSource({self.lake.root!r}, {self.run!r}, version={self.version})"

    @property
    def n_tokens(self) -> int:
        """Rows of the 1d table in this snapshot (non-BOS tokens by default)."""
        return self.snapshot.rows.get("tokens", 0)

    @property
    def n_contexts(self) -> int:
        return self.snapshot.contexts

    def _table(self, table: str):
        if table not in self.snapshot.tables:
            layout = {"tokens": "1d", "contexts": "2d"}[table]
            raise UserError(
                f"run {self.run!r} has no {layout} table: ingest one with --layout {layout}"
                + (" or use --live" if layout == "2d" else "")
            )
        return self.lake.dataset(self.run, table, self.snapshot.tables[table])

    def _hooks(self, hooks: Sequence[str] | None) -> list[str]:
        hooks = list(hooks or self.hooks)
        for h in hooks:
            if h not in self.hooks:
                raise UserError(f"hook {h!r} is not in run {self.run!r}: it has {', '.join(self.hooks)}")
        return hooks

    # -- 1d --------------------------------------------------------------------------------
    def token_batches(
        self,
        batch_size: int,
        hooks: Sequence[str] | None = None,
        *,
        seed: int = 0,
        start: int = 0,
        repeat: bool = False,
        shard: tuple[int, int] = (0, 1),
        rows: tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Iterator[TokenBatch]:
        """Shuffled token batches; ``start`` rows of the stream are skipped exactly (for resume).

        Activations come decoded; ``dtype`` (e.g. torch.float32) converts them too. Reading,
        shuffling, decoding and that conversion all run in a background thread, ahead of the consumer.

        ``rows=(lo, hi)``: only rows ``lo..hi-1`` of the 1d table in storage order (e.g. all but a
        held-out tail); the stream, its epochs and ``start`` then count those rows only.

        Order: the table is shuffled at write time (within ingest chunks); on top, blocks of at
        most ``block_rows`` rows (within a fragment) are read in a seeded order per epoch, gathered
        into windows of at least ``block_rows`` rows, and each window is permuted in memory.

        ``shard=(rank, world)`` (data-parallel): the stream is cut into global batches of
        ``batch_size * world`` rows, and this rank reads and gets only its micro-batch of each,
        stream rows ``[g*B*W + rank*B, g*B*W + (rank+1)*B)``. Ranks read disjoint rows, and
        together they see exactly the single-process stream (``start`` counts its rows).
        """
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard {shard}: need 0 <= rank < world")
        hooks = self._hooks(hooks)
        cols = ["token_id", "context_id", "position"] + [self.columns[h] for h in hooks]
        fragments = self._table("tokens").get_fragments()
        # (fragment, offset, rows) blocks of at most block_rows; each epoch reads them in its own seeded order
        lo, hi = rows or (0, self.n_tokens)
        if not 0 <= lo <= hi <= self.n_tokens:
            raise ValueError(f"rows {rows}: need 0 <= lo <= hi <= {self.n_tokens}")
        blocks_in_order, base = [], 0
        for f in fragments:  # the part of each fragment inside [lo, hi), in blocks of at most block_rows
            n = f.count_rows()
            first, end = max(lo - base, 0), min(hi - base, n)
            blocks_in_order += [(f, off, min(self.block_rows, end - off)) for off in range(first, end, self.block_rows)]
            base += n
        total = hi - lo
        if total == 0:
            raise UserError(f"run {self.run!r} has an empty 1d table")
        self._pos = {
            "kind": "tokens",
            "rows": start,
            "seed": seed,
            "run": self.run,
            "version": self.version,
            "world": world,
        }

        def windows():
            epoch = start // total
            pos = epoch * total  # stream position of the next window's first row
            while True:
                order = np.random.default_rng([seed, epoch, 1]).permutation(len(blocks_in_order))
                # consecutive blocks of this epoch's order are mixed in windows of >= block_rows rows,
                # so how well batches mix does not depend on how big the ingest's chunks were
                groups, cur, cur_rows = [], [], 0
                for j in order:
                    cur.append(blocks_in_order[j])
                    cur_rows += blocks_in_order[j][2]
                    if cur_rows >= self.block_rows:
                        groups.append(cur)
                        cur, cur_rows = [], 0
                groups += [cur] if cur else []
                for w, group in enumerate(groups):
                    n = sum(n for _, _, n in group)
                    pos, first = pos + n, pos
                    if pos <= start:
                        continue
                    at = np.arange(first, pos)
                    mine = (at >= start) & ((at // batch_size) % world == rank)
                    rows = np.random.default_rng([seed, epoch, w, 2]).permutation(n)[mine]  # in stream order
                    if len(rows):
                        yield self._read_window(group, rows, cols, whole=world == 1)
                epoch += 1
                if not repeat:
                    return

        def batches():
            carry: dict[str, torch.Tensor] | None = None  # a window's last rows, short of a batch
            # two stages in two threads: Lance reads the next window while this one is permuted and decoded
            for table, order in _prefetch(windows(), depth=1):
                block = self._gather(table, order, cols)
                n, i = len(block["token_id"]), 0
                if carry is not None:  # complete it from this window's first rows (never copy a whole window)
                    i = min(n, batch_size - len(carry["token_id"]))
                    carry = {c: torch.cat([carry[c], x[:i]]) for c, x in block.items()}
                    if len(carry["token_id"]) < batch_size:
                        continue
                    yield self._token_batch(carry, hooks, dtype)
                    carry = None
                while n - i >= batch_size:
                    yield self._token_batch({c: x[i : i + batch_size] for c, x in block.items()}, hooks, dtype)
                    i += batch_size
                carry = {c: x[i:] for c, x in block.items()} if i < n else None
            if carry is not None:
                yield self._token_batch(carry, hooks, dtype)

        for batch in _prefetch(batches()):
            self._pos["rows"] += len(batch) * world  # stream rows consumed: every rank's micro-batch
            yield batch

    def _read_window(self, group: list, rows: np.ndarray, cols: list[str], whole: bool) -> tuple[pa.Table, np.ndarray]:
        """(the window's rows as read, ``order``: where each of ``rows`` is in it). ``rows`` index into the
        window's blocks, concatenated. ``whole`` reads each block contiguously; otherwise only the
        wanted rows are read (Lance takes sorted offsets), so data-parallel ranks read disjoint rows."""
        if whole:
            table = pa.concat_tables(
                [self._read(f, "tokens", columns=cols, offset=off, limit=n) for f, off, n in group]
            )
            order = rows
        else:
            wanted, parts, lo = np.sort(rows), [], 0
            for f, off, n in group:
                sel = wanted[(wanted >= lo) & (wanted < lo + n)] - lo
                if len(sel):
                    parts.append(self._read(f, "tokens", columns=cols, indices=sel + off))
                lo += n
            table, order = pa.concat_tables(parts), np.searchsorted(wanted, rows)
        return table, order

    def _gather(self, table: pa.Table, order: np.ndarray, cols: list[str]) -> dict[str, torch.Tensor]:
        """The rows of ``table`` in ``order``, as tensors of stored cells per column. The permutation is a
        torch row gather (memcpy of whole cells), not Arrow's take, which gathers a fixed-size list
        element by element."""
        table = table.combine_chunks()
        index = torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64))
        out = {}
        with warnings.catch_warnings():  # Arrow's buffers are read-only; index_select copies out of them
            warnings.simplefilter("ignore", UserWarning)
            for c in cols:
                hook = self._hook_of.get(c)
                x = (
                    arrow_to_stored(table.column(c), self.codecs[hook], (self.d_model[hook],))
                    if hook
                    else torch.from_numpy(table.column(c).to_numpy())
                )
                out[c] = x.index_select(0, index)
        return out

    def _unreadable(self, table: str, files: str, e: Exception) -> UserError:
        return UserError(
            f"run {self.run!r} {table}.lance: cannot read {files} ({str(e).splitlines()[0][:150]}); "
            f"the file is damaged: `lake verify {self.run}` checks the whole run"
        )

    def _read(self, fragment, table: str, indices=None, **kwargs) -> pa.Table:
        try:
            return fragment.take(indices, **kwargs) if indices is not None else fragment.to_table(**kwargs)
        except Exception as e:
            raise self._unreadable(table, ", ".join(f.path for f in fragment.metadata.files), e) from None

    def _token_batch(self, t: dict[str, torch.Tensor], hooks: list[str], dtype: torch.dtype | None) -> TokenBatch:
        acts = {h: get_codec(self.codecs[h]).decode(t[self.columns[h]], self.d_model[h]) for h in hooks}
        return TokenBatch(
            acts={h: x if dtype is None else x.to(dtype) for h, x in acts.items()},
            token_id=t["token_id"],
            context_id=t["context_id"],
            position=t["position"],
        )

    # -- 2d --------------------------------------------------------------------------------
    def context_batches(
        self, batch_size: int, hooks: Sequence[str] | None = None, *, start: int = 0
    ) -> Iterator[ContextBatch]:
        """Whole contexts in context_id order, starting at context ``start``."""
        hooks = self._hooks(hooks)
        ds = self._table("contexts")
        cols = ["context_id", "doc_id", "tokens"] + [self.columns[h] for h in hooks]
        self._pos = {"kind": "contexts", "contexts": start, "run": self.run, "version": self.version}
        T = self.context_size
        scanner = ds.scanner(
            columns=cols,
            offset=start if start else None,
            batch_size=batch_size,
            scan_in_order=True,
            strict_batch_size=True,
        )

        def batches():
            try:
                for b in scanner.to_batches():
                    if len(b):
                        yield b
            except Exception as e:
                raise self._unreadable(
                    "contexts", ", ".join(f.path for fr in ds.get_fragments() for f in fr.metadata.files), e
                ) from None

        for b in _prefetch(batches()):
            batch = ContextBatch(
                acts={h: arrow_to_acts(b.column(self.columns[h]), self.codecs[h], (T, self.d_model[h])) for h in hooks},
                tokens=torch.from_numpy(b.column("tokens").flatten().to_numpy()).view(-1, T),
                context_id=torch.from_numpy(b.column("context_id").to_numpy()),
                doc_id=torch.from_numpy(b.column("doc_id").to_numpy()),
            )
            self._pos["contexts"] += len(batch)
            yield batch

    def state(self) -> dict:
        """Where the last iterator stands: pass ``rows``/``contexts`` back as ``start`` to resume."""
        return dict(self._pos)
