"""Explanations and scores of an analysis's features (auto-interp), stored beside its feature table.

One row per feature that has any of: an explanation (with what the explainer was shown), a
hand-written note, detection / fuzzing scores (with what the scorer was shown). Fields not set
are null; an update sets only the fields it names, so scoring never drops an explanation and
re-explaining never drops a note.

Embedded (the analysis lives in the lake): ``analyses/<name>/explanations-<id>.lance`` plus
``analyses/<name>/explanations.json`` (``ExplanationsRecord``: the table's name and the sha256 of
its data files). An update writes a whole new table, then swaps the record (an atomic write),
then removes the old table: readers see the old rows or the new ones, never a mix. Writers in
one process are serialised; a writer that finds the record changed under it (another process)
merges onto the newer table before swapping. ``lake query`` sees the table as
``explanations__<analysis>``.

MongoDB (the analysis lives there): collection ``explanations``, one document per
(analysis, feature) with ``_id`` ``"<analysis>:<feature>"`` (unique index on analysis, feature);
an update is one ``$set`` per feature, so concurrent writers of different fields never clash.
"""

from __future__ import annotations

import re
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar, Protocol

import pyarrow as pa

from saelake.lake import Lake, UserError
from saelake.lake.checksums import dataset_checksums
from saelake.lake.records import FileChecksum, Record

SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("explanation", pa.string()),
        ("explainer", pa.string()),
        ("explainer_model", pa.string()),
        ("examples", pa.list_(pa.int64())),  # context ids of the examples the explainer saw
        ("example_kinds", pa.list_(pa.string())),  # top | interval, one per example
        ("promoted", pa.list_(pa.string())),  # the promoted tokens it saw
        ("prompt_sha256", pa.string()),
        ("explained_at", pa.string()),
        ("note", pa.string()),
        ("detection", pa.float64()),
        ("fuzzing", pa.float64()),
        ("scorer", pa.string()),
        ("scorer_model", pa.string()),
        ("score_examples", pa.list_(pa.int64())),  # context ids the scorer classified
        ("scored_at", pa.string()),
    ]
)
FIELDS = tuple(SCHEMA.names)
EXPLANATION_FIELDS = (
    "explanation",
    "explainer",
    "explainer_model",
    "examples",
    "example_kinds",
    "promoted",
    "prompt_sha256",
    "explained_at",
)
SCORE_FIELDS = ("detection", "fuzzing", "scorer", "scorer_model", "score_examples", "scored_at")
MAX_TEXT = 2000  # characters of an explanation or a note


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_text(value, what: str) -> str | None:
    """An explanation or note as stored: a string (stripped, bounded) or None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{what} must be a string, not {type(value).__name__}")
    value = value.strip()
    if len(value) > MAX_TEXT:
        raise UserError(f"{what} is {len(value)} characters long; at most {MAX_TEXT}")
    return value or None


@dataclass
class ExplanationsRecord(Record):
    """``analyses/<name>/explanations.json``: which table holds the rows, and its data files' checksums."""

    SCHEMA_VERSION: ClassVar[int] = 1
    analysis: str
    table: str
    rows: int
    updated: str
    checksums: dict[str, FileChecksum]
    schema_version: int = 1


class ExplanationStore(Protocol):
    def rows(self, analysis: str, features: list[int] | None = None) -> dict[int, dict]: ...
    def update(self, analysis: str, sae: str, changes: dict[int, dict]) -> None: ...
    def search(self, analysis: str, text: str) -> set[int]: ...
    def version(self, analysis: str) -> str | None: ...


def _empty(feature: int) -> dict:
    return {k: None for k in FIELDS} | {"feature": int(feature)}


def _check_changes(changes: dict[int, dict]) -> dict[int, dict]:
    out = {}
    for f, ch in changes.items():
        unknown = set(ch) - set(FIELDS) - {"feature"}
        if unknown:
            raise UserError(f"unknown explanation field {sorted(unknown)[0]!r} (fields: {', '.join(FIELDS[1:])})")
        out[int(f)] = {k: v for k, v in ch.items() if k != "feature"}
    return out


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(key: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


class EmbeddedExplanations:
    """Explanations of the lake's embedded analyses (see the module docstring)."""

    def __init__(self, lake: Lake):
        self.lake, self.st = lake, lake.storage

    def record(self, analysis: str) -> ExplanationsRecord | None:
        data = self.st.read_json("analyses", analysis, "explanations.json")
        if data is None:
            return None
        return ExplanationsRecord.from_json(data, self.st.uri("analyses", analysis, "explanations.json"))

    def version(self, analysis: str) -> str | None:
        """Changes whenever the rows do (caches key on it)."""
        rec = self.record(analysis)
        return rec.table if rec else None

    def dataset(self, analysis: str, rec: ExplanationsRecord | None = None):
        import lance

        rec = rec or self.record(analysis)
        if rec is None:
            return None
        return lance.dataset(self.st.uri("analyses", analysis, rec.table), storage_options=self.st.storage_options)

    def rows(self, analysis: str, features: list[int] | None = None) -> dict[int, dict]:
        ds = self.dataset(analysis)
        if ds is None:
            return {}
        flt = None if features is None else f"feature IN ({','.join(str(int(f)) for f in features) or '-1'})"
        return {r["feature"]: r for r in ds.to_table(filter=flt).to_pylist()}

    def search(self, analysis: str, text: str) -> set[int]:
        """Features whose explanation or note contains ``text`` (case-insensitive), by SQL over the table."""
        import duckdb

        ds = self.dataset(analysis)
        if ds is None or not text:
            return set()
        con = duckdb.connect()
        try:
            con.execute("set enable_progress_bar = false")
            con.register("e", ds.scanner(columns=["feature", "explanation", "note"]).to_reader())
            pat = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            got = con.execute(
                "select feature from e where explanation ilike ? escape '\\' or note ilike ? escape '\\'", [pat, pat]
            ).fetchall()
        finally:
            con.close()
        return {int(r[0]) for r in got}

    def update(self, analysis: str, sae: str, changes: dict[int, dict]) -> None:
        """Set the given fields of the given features (rows are created as needed); see the docstring."""
        import lance

        changes = _check_changes(changes)
        if not self.st.exists("analyses", analysis, "analysis.json"):
            raise UserError(f"no analysis {analysis!r} in the lake")
        with _lock(self.st.uri("analyses", analysis)):
            for _ in range(5):
                base = self.record(analysis)
                rows = self.rows(analysis) if base else {}
                for f, ch in changes.items():
                    rows[f] = {**rows.get(f, _empty(f)), **ch}
                table = f"explanations-{uuid.uuid4().hex[:8]}.lance"
                uri = self.st.uri("analyses", analysis, table)
                data = pa.Table.from_pylist([rows[f] for f in sorted(rows)], schema=SCHEMA)
                try:
                    lance.write_dataset(
                        data, uri, schema=SCHEMA, mode="create", storage_options=self.st.storage_options
                    )
                    sums = dataset_checksums(self.st, uri, prefix=f"{table}/")
                    now_rec = self.record(analysis)
                    if (now_rec.table if now_rec else None) != (base.table if base else None):
                        self.st.remove("analyses", analysis, table)  # another process wrote: merge onto its rows
                        continue
                    rec = ExplanationsRecord(
                        analysis=analysis, table=table, rows=len(rows), updated=now(), checksums=sums
                    )
                    self.st.write_json(rec.to_json(), "analyses", analysis, "explanations.json")
                except BaseException:
                    self.st.remove("analyses", analysis, table)
                    raise
                if base is not None:
                    self.st.remove("analyses", analysis, base.table)
                return
        raise UserError(f"explanations of analysis {analysis!r} kept changing under this write: try again")


class MongoExplanations:
    """Explanations of analyses stored in MongoDB: collection ``explanations``."""

    def __init__(self, store):  # an analyze.stores.MongoStore
        self.db = store.db
        self.db.explanations.create_index([("analysis", 1), ("feature", 1)], unique=True, name="analysis_feature")

    def version(self, analysis: str) -> str | None:
        doc = self.db.explanations.find_one({"analysis": analysis}, {"_stamp": 1}, sort=[("_stamp", -1)])
        return doc.get("_stamp") if doc else None

    def rows(self, analysis: str, features: list[int] | None = None) -> dict[int, dict]:
        q: dict = {"analysis": analysis}
        if features is not None:
            q["feature"] = {"$in": [int(f) for f in features]}
        out = {}
        for d in self.db.explanations.find(q, {"_id": 0, "analysis": 0, "sae": 0, "_stamp": 0}):
            out[int(d["feature"])] = _empty(d["feature"]) | d
        return out

    def search(self, analysis: str, text: str) -> set[int]:
        if not text:
            return set()
        rx = {"$regex": re.escape(text), "$options": "i"}
        q = {"analysis": analysis, "$or": [{"explanation": rx}, {"note": rx}]}
        return {int(d["feature"]) for d in self.db.explanations.find(q, {"_id": 0, "feature": 1})}

    def update(self, analysis: str, sae: str, changes: dict[int, dict]) -> None:
        from pymongo import UpdateOne

        changes = _check_changes(changes)
        if self.db.analyses.find_one({"name": analysis}, {"_id": 1}) is None:
            raise UserError(f"no analysis {analysis!r} in this MongoDB store")
        stamp = f"{now()}-{uuid.uuid4().hex[:8]}"
        ops = [
            UpdateOne(
                {"_id": f"{analysis}:{f}"},
                {
                    "$set": {**ch, "_stamp": stamp},
                    "$setOnInsert": {"analysis": analysis, "sae": sae, "feature": int(f)},
                },
                upsert=True,
            )
            for f, ch in changes.items()
        ]
        if ops:
            self.db.explanations.bulk_write(ops, ordered=False)


def explanation_store(lake: Lake, rec, mongo=None) -> ExplanationStore:
    """The explanation store of analysis record ``rec``: embedded when its features are in the lake,
    else MongoDB (``mongo``: an open analyze.stores.MongoStore, else one is opened from the record)."""
    store = rec.store if hasattr(rec, "store") else rec.get("store")
    if (store or "embedded") == "embedded":
        return EmbeddedExplanations(lake)
    if mongo is None:
        from .stores import MongoStore

        mongo = MongoStore(store)
    return MongoExplanations(mongo)


def relations(lake, sql: str) -> dict:
    """``lake query`` relations ``explanations__<analysis>`` (the saelake.relations entry point)."""
    emb = EmbeddedExplanations(lake)
    wanted = set(re.findall(r"\bexplanations__([A-Za-z0-9_]+)\b", sql))
    if not wanted:
        return {}
    names = {re.sub(r"[^A-Za-z0-9_]", "_", n): n for n in lake.storage.listdir("analyses")}
    out = {}
    for key in wanted:
        name = names.get(key)
        if name is None or not lake.storage.exists("analyses", name, "analysis.json"):
            raise UserError(f"no analysis {key!r} for explanations__{key}: see `lake ls`")
        ds = emb.dataset(name)
        if ds is None:
            out[f"explanations__{key}"] = pa.RecordBatchReader.from_batches(SCHEMA, iter([]))
        else:
            out[f"explanations__{key}"] = ds.scanner().to_reader()
    return out
