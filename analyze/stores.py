"""Feature stores behind one interface: embedded Lance tables in the lake, or MongoDB.

Embedded (default): ``<lake>/analyses/<name>/features-<id>.lance`` (one row per feature, the
schema in ``analyze.table``) and ``analysis.json`` (the analysis record, with the sha256 of each
of the table's data files for ``lake verify``), written last: an
analysis exists once its ``analysis.json`` does, so a failed run leaves nothing visible (and
its partial table is removed). ``--overwrite`` writes the new table, swaps the record, then
removes the old table.

MongoDB (``mongodb://HOST:PORT/DB``, database ``saelake`` when the URI names none):
collections ``saes`` (one document per SAE: its config, key ``name``), ``analyses`` (the
analysis record, unique ``name``) and ``features`` (one compact document per (sae, analysis,
feature): the feature-table row plus ``sae`` and ``analysis``, arrays inline, unique index on
(sae, analysis, feature)). The ``analyses`` document is written last; a failed run deletes the
features it wrote. The lake also gets ``analyses/<name>/analysis.json`` naming the store (URI
without password) so that ``lake ls``/catalog sync list it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import urlparse, urlunparse

import pyarrow as pa

from saelake.lake import Lake, UserError
from saelake.lake.checksums import dataset_checksums
from saelake.lake.records import AnalysisRecord

from .table import SCHEMA


class FeatureStore(Protocol):
    kind: str
    where: str  # store description for records (no secrets)

    def exists(self, name: str) -> bool: ...
    def write(self, record: AnalysisRecord, batches: Iterable[pa.RecordBatch], overwrite: bool = False) -> None: ...
    def record(self, name: str) -> AnalysisRecord | None: ...
    def records(self, sae: str) -> list[AnalysisRecord]: ...
    def feature(self, name: str, index: int) -> dict | None: ...
    def scalars(self, name: str) -> list[dict]: ...


def redact(uri: str) -> str:
    """The URI without its password (mongodb://user:***@host/db)."""
    p = urlparse(uri)
    if p.password is None:
        return uri
    netloc = p.netloc.replace(f":{p.password}@", ":***@", 1)
    return urlunparse(p._replace(netloc=netloc))


class EmbeddedStore:
    kind = "embedded"

    def __init__(self, lake: Lake):
        self.lake, self.st = lake, lake.storage
        self.where = "embedded"

    def exists(self, name: str) -> bool:
        return self.st.exists("analyses", name, "analysis.json")

    def record(self, name: str) -> AnalysisRecord | None:
        return self.lake.analysis_record(name)

    def records(self, sae: str) -> list[AnalysisRecord]:
        """The lake's analyses of SAE ``sae`` (records of MongoDB analyses included: pointers)."""
        return [r for r in map(self.record, self.lake.analysis_names()) if r and r.sae == sae]

    def table_uri(self, name: str, record: AnalysisRecord | None = None) -> str:
        record = record or self.record(name)
        if record is None or not record.features_table:
            raise UserError(
                f"analysis {name!r} has no embedded feature table" + (f" (store {record.store})" if record else "")
            )
        return self.st.uri("analyses", name, record.features_table)

    def dataset(self, name: str, record: AnalysisRecord | None = None):
        import lance

        return lance.dataset(self.table_uri(name, record), storage_options=self.st.storage_options)

    def write(self, record: AnalysisRecord, batches: Iterable[pa.RecordBatch], overwrite: bool = False) -> None:
        """Write the table, then the record naming it and its data files' checksums (both set here)."""
        import lance

        name = record.name
        old = self.record(name) if overwrite else None
        table = f"features-{uuid.uuid4().hex[:8]}.lance"
        uri = self.st.uri("analyses", name, table)
        try:
            reader = pa.RecordBatchReader.from_batches(SCHEMA, iter(batches))
            lance.write_dataset(reader, uri, schema=SCHEMA, mode="create", storage_options=self.st.storage_options)
            record.features_table = table
            record.checksums = dataset_checksums(self.st, uri, prefix=f"{table}/")  # `lake verify` checks them
            self.st.write_json(record.to_json(), "analyses", name, "analysis.json")
        except BaseException:
            self.st.remove("analyses", name, table)
            if not self.exists(name):
                self.st.remove("analyses", name)
            raise
        if old and old.features_table and old.features_table != table:
            self.st.remove("analyses", name, old.features_table)

    def feature(self, name: str, index: int) -> dict | None:
        rows = self.dataset(name).to_table(filter=f"feature = {int(index)}").to_pylist()
        return rows[0] if rows else None

    def scalars(self, name: str) -> list[dict]:
        from .table import SCALARS

        return self.dataset(name).to_table(columns=SCALARS).sort_by("feature").to_pylist()


class MongoStore:
    kind = "mongodb"

    def __init__(self, uri: str, timeout_s: float = 3.0):
        import pymongo
        from pymongo.errors import PyMongoError

        self.uri, self.where = uri, redact(uri)
        db = urlparse(uri).path.strip("/") or "saelake"
        if not re.match(r"^[A-Za-z0-9_-]{1,63}$", db):
            raise UserError(f"bad MongoDB database name {db!r} in {self.where}")
        ms = int(timeout_s * 1000)
        try:
            self.client = pymongo.MongoClient(
                uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=max(ms, 60_000)
            )
            self.client.admin.command("ping")
            self.db = self.client[db]
            self.db.features.create_index(
                [("sae", 1), ("analysis", 1), ("feature", 1)], unique=True, name="sae_analysis_feature"
            )
            self.db.analyses.create_index([("name", 1)], unique=True, name="name")
            self.db.saes.create_index([("name", 1)], unique=True, name="name")
        except PyMongoError as e:
            raise UserError(
                f"cannot reach MongoDB at {self.where} ({type(e).__name__}): start it or fix --store"
            ) from None
        except Exception as e:  # bad URI
            raise UserError(f"bad MongoDB URI {self.where}: {str(e).splitlines()[0][:200]}") from None

    def exists(self, name: str) -> bool:
        return self.db.analyses.find_one({"name": name}, {"_id": 1}) is not None

    def _record(self, doc: dict | None) -> AnalysisRecord | None:
        return None if doc is None else AnalysisRecord.from_json(doc, f"{self.where} analyses {doc.get('name')!r}")

    def record(self, name: str) -> AnalysisRecord | None:
        return self._record(self.db.analyses.find_one({"name": name}, {"_id": 0, "scalars": 0}))

    def records(self, sae: str) -> list[AnalysisRecord]:
        return [self._record(d) for d in self.db.analyses.find({"sae": sae}, {"_id": 0, "scalars": 0})]

    def write(
        self,
        record: AnalysisRecord,
        batches: Iterable[pa.RecordBatch],
        overwrite: bool = False,
        sae_config: dict | None = None,
    ) -> None:
        from pymongo import InsertOne

        name, sae = record.name, record.sae
        if overwrite:
            self.db.analyses.delete_one({"name": name})
        self.db.features.delete_many({"analysis": name})  # leftovers of a failed run
        from .table import SCALARS

        scalars: dict[str, list] = {k: [] for k in SCALARS}
        try:
            for batch in batches:
                # _id = "<analysis>:<feature>": servers look documents up by _id fastest
                docs = [
                    {"_id": f"{name}:{row['feature']}", "sae": sae, "analysis": name, **row}
                    for row in batch.to_pylist()
                ]
                if docs:
                    self.db.features.bulk_write([InsertOne(d) for d in docs], ordered=False)
                for k in SCALARS:
                    scalars[k] += batch.column(k).to_pylist()
            if sae_config is not None:
                self.db.saes.replace_one({"name": sae}, {**sae_config, "name": sae}, upsert=True)
            # the per-feature numbers (for lists and histograms) ride along as compact arrays
            self.db.analyses.replace_one({"name": name}, {**record.to_json(), "scalars": scalars}, upsert=True)
        except BaseException:
            self.db.features.delete_many({"analysis": name})
            raise

    def _key(self, name: str) -> dict:
        rec = self.record(name)
        if rec is None:
            raise UserError(f"no analysis {name!r} in MongoDB at {self.where}")
        return {"sae": rec.sae, "analysis": name}

    def feature(self, name: str, index: int) -> dict | None:
        self._key(name)
        return self.db.features.find_one({"_id": f"{name}:{int(index)}"}, {"_id": 0, "sae": 0, "analysis": 0})

    def scalars(self, name: str) -> list[dict]:
        self._key(name)
        cols = (self.db.analyses.find_one({"name": name}, {"_id": 0, "scalars": 1}) or {}).get("scalars") or {}
        if not cols:
            return []
        return sorted((dict(zip(cols, vals)) for vals in zip(*cols.values())), key=lambda d: d["feature"])

    def close(self) -> None:
        self.client.close()


def open_store(lake: Lake, store: str | None) -> FeatureStore:
    if not store or store == "embedded":
        return EmbeddedStore(lake)
    if store.startswith(("mongodb://", "mongodb+srv://")):
        return MongoStore(store)
    raise UserError(f"unknown --store {store!r}: use mongodb://HOST:PORT/DB or leave it out (embedded)")
