"""Content checksums of the lake's data files, recorded in the lake itself (they travel with it).

Runs: every commit of a run's table records the sha256 and size of each data file it adds,
*before* the commit (so no committed file lacks one), in

    runs/<run>/checksums/<table>-<contexts_done, 12 digits>.json     one per commit while ingesting
    runs/<run>/checksums/<table>.json                                 merged when a snapshot completes

each a ``TableChecksums`` record: ``{"table", "files": {data file name: {"sha256", "bytes"}}}``,
names as in ``<table>.lance/data/``. A resumed commit rewrites the same file (same
``contexts_done``); entries of data files that no commit kept (a crash between the
checksum file and the commit, or ``lake gc``) are dropped when the files are merged.

Analyses: the analysis record carries its table's checksums (``AnalysisRecord.checksums``,
paths relative to the analysis folder). SAE weights: ``weights_sha256`` in the SAE's config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import lance
from lance.fragment import FragmentMetadata

from .records import FileChecksum, Record
from .storage import LakeStorage

BLOCK = 8 << 20  # bytes read per hash update: large reads keep S3 round trips few


@dataclass
class TableChecksums(Record):
    """One checksum file of a run's table."""

    SCHEMA_VERSION: ClassVar[int] = 1
    table: str
    files: dict[str, FileChecksum]
    schema_version: int = 1


def file_checksum(storage: LakeStorage, uri: str) -> FileChecksum:
    """sha256 and size of one file, streamed (locally from the page cache right after a write)."""
    h, n = hashlib.sha256(), 0
    with storage.fs.open(uri, "rb", block_size=BLOCK) as f:
        while block := f.read(BLOCK):
            h.update(block)  # hashlib releases the GIL for large blocks: the forward keeps running
            n += len(block)
    return FileChecksum(sha256=h.hexdigest(), bytes=n)


def fragment_checksums(storage: LakeStorage, dataset_uri: str, fragments: list[str]) -> dict[str, FileChecksum]:
    """Checksums of the data files of written fragments (FragmentMetadata as JSON strings)."""
    out = {}
    for frag in fragments:
        for f in FragmentMetadata.from_json(frag).files:
            out[f.path] = file_checksum(storage, f"{dataset_uri}/data/{f.path}")
    return out


def data_files(ds: lance.LanceDataset) -> list[tuple[str, int | None]]:
    """(data file name, size Lance recorded) of every fragment of a dataset version."""
    return [(f.path, getattr(f, "file_size_bytes", None)) for frag in ds.get_fragments() for f in frag.metadata.files]


def dataset_checksums(storage: LakeStorage, dataset_uri: str, prefix: str = "") -> dict[str, FileChecksum]:
    """Checksums of every data file of a dataset's latest version, keyed ``prefix + "data/" + name``."""
    ds = lance.dataset(dataset_uri, storage_options=storage.storage_options)
    return {f"{prefix}data/{p}": file_checksum(storage, f"{dataset_uri}/data/{p}") for p, _ in data_files(ds)}


# -- the checksum files of a run ---------------------------------------------------------------
def record_commit(
    storage: LakeStorage, run: str, table: str, contexts_done: int, files: dict[str, FileChecksum]
) -> None:
    """Record the checksums of the data files that the commit up to ``contexts_done`` adds."""
    rec = TableChecksums(table=table, files=files)
    storage.write_json(rec.to_json(), "runs", run, "checksums", f"{table}-{contexts_done:012d}.json")


def _checksum_files(storage: LakeStorage, run: str, table: str) -> list[str]:
    return [
        n
        for n in storage.listdir("runs", run, "checksums")
        if n == f"{table}.json" or (n.startswith(f"{table}-") and n.endswith(".json"))
    ]


def has_checksums(storage: LakeStorage, run: str) -> bool:
    return bool(storage.listdir("runs", run, "checksums"))


def recorded(storage: LakeStorage, run: str, table: str) -> dict[str, FileChecksum]:
    """Every checksum recorded for a run's table: data file name -> checksum."""
    out: dict[str, FileChecksum] = {}
    for name in sorted(_checksum_files(storage, run, table)):
        data = storage.read_json("runs", run, "checksums", name)
        if data is not None:
            out |= TableChecksums.from_json(data, storage.uri("runs", run, "checksums", name)).files
    return out


def merge(storage: LakeStorage, run: str, table: str, keep: set[str]) -> None:
    """Merge a table's checksum files into ``<table>.json``, keeping the entries of ``keep`` (the
    data files its latest version references). The merged file is written before the parts go,
    so a crash in between leaves duplicates, never a gap."""
    parts = _checksum_files(storage, run, table)
    files = {k: v for k, v in recorded(storage, run, table).items() if k in keep}
    storage.write_json(TableChecksums(table=table, files=files).to_json(), "runs", run, "checksums", f"{table}.json")
    for name in parts:
        if name != f"{table}.json":
            storage.remove("runs", run, "checksums", name)


def check(
    storage: LakeStorage, where: str, uri: str, lance_size: int | None, want: FileChecksum | None, deep: bool
) -> str | None:
    """What is wrong with one data file (None: nothing found). ``deep`` hashes its content."""
    try:
        size = storage.fs.size(uri)
    except FileNotFoundError:
        return f"{where}: data file {uri} is missing"
    expected = want.bytes if want else lance_size
    if expected and size != expected:
        return f"{where}: data file {uri} is {size} bytes, {expected} were recorded (truncated or overwritten)"
    if deep and want:
        got = file_checksum(storage, uri)
        if got.sha256 != want.sha256:
            return (
                f"{where}: data file {uri} is damaged: its sha256 {got.sha256[:12]}... differs from the one "
                f"recorded at its commit ({want.sha256[:12]}...)"
            )
    return None
