"""Text corpora -> BOS-prefixed, packed contexts of ``context_size`` tokens.

A corpus is local files or a directory (txt, jsonl/json, parquet, csv), ``builtin``
(English text shipped with saelake, the same everywhere, no download), or a hub dataset name.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
FORTUNES = "/usr/share/games/fortunes"


# -- built-in offline text ---------------------------------------------------------------
# `builtin` is text shipped with saelake (lake/data/builtin.jsonl.gz, built by build_builtin.py from
# Python 3.11's pydoc topics and standard-library docstrings), so it is the same on every machine.
BUILTIN_FILE = Path(__file__).with_name("data") / "builtin.jsonl.gz"
BUILTIN_SHA256 = "51a2d00829577490fb09fa8c393ce7b7095bfef1ee9fbbe0fb4fc413982d1571"  # of the uncompressed lines
BUILTIN_PARTS = ("pydoc", "stdlib")  # in the file's order; `builtin` is both


def _shipped(parts: tuple[str, ...]) -> Iterator[str]:
    try:
        raw = gzip.decompress(BUILTIN_FILE.read_bytes())
    except (OSError, EOFError) as e:
        raise UserError(f"the builtin corpus {BUILTIN_FILE} is missing or damaged ({e}): reinstall saelake") from None
    if hashlib.sha256(raw).hexdigest() != BUILTIN_SHA256:
        raise UserError(f"the builtin corpus {BUILTIN_FILE} is not the one this saelake ships: reinstall saelake")
    for line in raw.decode().splitlines():
        doc = json.loads(line)
        if doc["source"] in parts:
            yield doc["text"]


def _fortunes() -> Iterator[str]:
    """Debian's fortunes package, where installed: only when asked for by name (builtin:fortunes)."""
    if not os.path.isdir(FORTUNES):
        raise UserError("builtin:fortunes needs Debian's fortunes package: apt-get install fortunes")
    for path in sorted(glob.glob(os.path.join(FORTUNES, "*"))):
        if "." in os.path.basename(path) or not os.path.isfile(path):
            continue  # skip .dat index files
        with open(path, encoding="utf-8", errors="replace") as f:
            for entry in f.read().split("\n%\n"):
                if len(entry.strip()) > 40:
                    yield entry.strip()


def _builtin(name: str) -> Iterator[str]:
    part = name.removeprefix("builtin").removeprefix(":")
    if part == "fortunes":
        return _fortunes()
    if part and part not in BUILTIN_PARTS:
        raise UserError(
            f"unknown built-in corpus {name!r}: use builtin, "
            + ", ".join(f"builtin:{k}" for k in (*BUILTIN_PARTS, "fortunes"))
        )
    return _shipped((part,) if part else BUILTIN_PARTS)


# -- files and the hub ---------------------------------------------------------------------
def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in BUILDERS)
    if not files:
        raise UserError(f"no corpus files in {path}: expected {', '.join(sorted(BUILDERS))}")
    builders = {BUILDERS.get(p.suffix.lower()) for p in files}
    if None in builders:
        raise UserError(f"unsupported corpus file {path}: use one of {', '.join(sorted(BUILDERS))}")
    if len(builders) > 1:
        raise UserError(f"{path} mixes file types {sorted(builders)}: point --dataset at one kind")
    return builders.pop(), [str(p) for p in files]


def _rows(spec: str, text_column: str) -> Iterator[str]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors reach the user as one UserError
    path = Path(spec).expanduser()
    builder = None
    if path.exists():
        builder, files = _local_files(path)
        if all(os.path.getsize(f) == 0 for f in files):
            raise UserError(f"corpus {spec} is empty: no documents to read")
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    elif spec.startswith((".", "/", "~")) or spec.endswith(tuple(BUILDERS)):
        raise UserError(f"dataset path {spec} does not exist: give a file, a folder, 'builtin', or a hub name")
    elif os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(
            f"dataset {spec!r} is neither a local path nor 'builtin', and hub access is off (HF_DATASETS_OFFLINE=1)"
        )
    else:
        try:
            ds = datasets.load_dataset(spec, split="train", streaming=True)
        except Exception as e:
            raise UserError(
                f"cannot open hub dataset {spec!r} ({type(e).__name__}): check the name and network"
            ) from None
    first = True
    for row in _parsed(ds, spec, builder):
        if first and text_column not in row:
            raise UserError(f"text column {text_column!r} not in {spec}: columns are {sorted(row)}; pass --text-column")
        first = False
        text = row[text_column]
        if isinstance(text, str) and text.strip():
            yield text


def _parsed(ds, spec: str, builder: str | None) -> Iterator[dict]:
    """The rows of ``ds``; a file the parser cannot read (binary, malformed) is a UserError."""
    rows = iter(ds)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # the datasets/pyarrow parsers raise many types; name the file instead
            what = f"a {builder} file" if builder else "a dataset"
            raise UserError(
                f"cannot read {spec} as {what} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
            ) from None
        yield row


def documents(spec: str, text_column: str = "text") -> Iterator[str]:
    """The corpus as a stream of document strings, in a fixed order."""
    if spec == "builtin" or spec.startswith("builtin:"):
        return _builtin(spec)
    return _rows(spec, text_column)


def check_corpus(spec: str, text_column: str = "text") -> None:
    """Fail fast on a bad corpus (missing path, column, unknown built-in) before any model work."""
    for _ in documents(spec, text_column):
        return
    raise UserError(f"corpus {spec} has no non-empty documents")


# -- packing ---------------------------------------------------------------------------------
@dataclass
class Context:
    context_id: int
    doc_id: int  # document of the first non-BOS token
    offset: int  # token offset of that token inside its document
    tokens: np.ndarray  # int32 [context_size], tokens[0] == BOS


def _tokenized(docs: Iterable[str], tokenizer, batch: int = 64) -> Iterator[tuple[int, np.ndarray]]:
    pending: list[str] = []
    doc_id = 0
    for text in docs:
        pending.append(text)
        if len(pending) == batch:
            for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
                yield doc_id, np.asarray(ids, dtype=np.int32)
                doc_id += 1
            pending = []
    if pending:
        for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
            yield doc_id, np.asarray(ids, dtype=np.int32)
            doc_id += 1


def pack_contexts(docs: Iterable[str], tokenizer, context_size: int, bos: int) -> Iterator[Context]:
    """Concatenate documents (BOS between them) and cut into contexts that each start with BOS.

    Each context is ``[BOS] + next (context_size - 1) stream tokens``; a separator BOS that
    would land right after the leading BOS is skipped. The final partial context is dropped.
    """
    need = context_size - 1
    toks, docs_, offs = [], [], []  # pending pieces of the stream
    have, context_id, started = 0, 0, False
    for doc_id, ids in _tokenized(docs, tokenizer):
        if len(ids) == 0:
            continue
        if started:  # separator, attributed to the next document at offset -1
            toks.append(np.array([bos], np.int32))
            docs_.append(np.array([doc_id]))
            offs.append(np.array([-1]))
            have += 1
        started = True
        toks.append(ids)
        docs_.append(np.full(len(ids), doc_id))
        offs.append(np.arange(len(ids)))
        have += len(ids)
        if have < need + 1:
            continue
        t, d, o = np.concatenate(toks), np.concatenate(docs_), np.concatenate(offs)
        i = 0
        while True:
            if i < len(t) and o[i] == -1:
                i += 1  # never BOS BOS at the start of a context
            if len(t) - i < need:
                break
            tokens = np.empty(context_size, np.int32)
            tokens[0] = bos
            tokens[1:] = t[i : i + need]
            yield Context(context_id, int(d[i]), int(o[i]), tokens)
            context_id += 1
            i += need
        toks, docs_, offs = [t[i:]], [d[i:]], [o[i:]]
        have = len(t) - i
