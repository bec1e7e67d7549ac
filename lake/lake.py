"""A lake: a root URI holding runs (activation tables + manifests), SAEs and analyses."""

from __future__ import annotations

import itertools
import re
from functools import cached_property
from importlib.metadata import entry_points

import lance

from saelake.catalog import Catalog, CatalogError, check_select

from .errors import UserError
from .records import AnalysisRecord, LatentIndexRecord, RunManifest
from .storage import LakeStorage, check_name, saelake_home
from .tables import as_float32_for_sql

TABLES = {"1d": "tokens", "2d": "contexts"}


class Lake:
    def __init__(self, root: str):
        self.storage = LakeStorage(root)
        self.root = self.storage.root

    def __repr__(self) -> str:
        return f"Lake({self.root!r})"

    # -- runs ------------------------------------------------------------------------------
    def run_names(self) -> list[str]:
        return [n for n in self.storage.listdir("runs") if self.storage.exists("runs", n, "manifest.json")]

    def manifest(self, run: str) -> RunManifest:
        check_name(run, "run name")
        m = self.storage.read_json("runs", run, "manifest.json")
        if m is None:
            known = self.run_names()
            raise UserError(
                f"no run {run!r} in {self.root}"
                + (f": runs are {', '.join(known)}" if known else ": the lake has no runs yet (lake ingest)")
            )
        return RunManifest.from_json(m, self.storage.uri("runs", run, "manifest.json"))

    def write_manifest(self, manifest: RunManifest) -> None:
        self.storage.write_json(manifest.to_json(), "runs", manifest.name, "manifest.json")

    def analysis_names(self) -> list[str]:
        return [n for n in self.storage.listdir("analyses") if self.storage.exists("analyses", n, "analysis.json")]

    def analysis_record(self, name: str) -> AnalysisRecord | None:
        """``analyses/<name>/analysis.json`` (None if absent); analyze.stores writes it."""
        rec = self.storage.read_json("analyses", name, "analysis.json")
        return (
            None if rec is None else AnalysisRecord.from_json(rec, self.storage.uri("analyses", name, "analysis.json"))
        )

    def index_names(self) -> list[str]:
        return [n for n in self.storage.listdir("indexes") if self.storage.exists("indexes", n, "index.json")]

    def index_record(self, name: str) -> LatentIndexRecord | None:
        """``indexes/<name>/index.json`` (None if absent); ``lake encode`` writes it."""
        rec = self.storage.read_json("indexes", name, "index.json")
        return (
            None if rec is None else LatentIndexRecord.from_json(rec, self.storage.uri("indexes", name, "index.json"))
        )

    def table_uri(self, run: str, table: str) -> str:
        return self.storage.uri("runs", run, f"{table}.lance")

    def dataset(self, run: str, table: str, version: int | str | None = None) -> lance.LanceDataset:
        uri = self.table_uri(run, table)
        try:
            return lance.dataset(uri, version=version, storage_options=self.storage.storage_options)
        except Exception as e:
            raise UserError(
                f"cannot open {table} table of run {run!r} at version {version} ({uri}): {str(e).splitlines()[0][:200]}"
            ) from None

    # -- catalog ---------------------------------------------------------------------------
    @cached_property
    def catalog(self) -> Catalog:
        if self.storage.is_s3:  # one local catalog file per remote root
            return Catalog(saelake_home() / "catalogs" / f"{self.storage.local_cache_key()}.duckdb")
        return Catalog(self.storage.uri("catalog.duckdb"))

    def register_run(self, manifest: RunManifest) -> None:
        try:
            self.catalog.upsert_run(manifest.to_json(), self.storage.uri("runs", manifest.name))
        except CatalogError as e:
            raise UserError(f"{e} (the manifest is saved; run `lake catalog sync` later)") from None

    def sync(self) -> dict[str, int]:
        """Rebuild the catalog from the manifests (the source of truth); returns counts.

        Runs: ``runs/<run>/manifest.json``. SAEs: ``saes/<sae>/config.json`` (+ ``metrics.json``,
        a list of {step, tokens, name, value}). Analyses: ``analyses/<name>/analysis.json``. Latent
        indexes: ``indexes/<name>/index.json``.
        """
        st = self.storage
        runs = [(self.manifest(n).to_json(), st.uri("runs", n)) for n in self.run_names()]
        saes = [
            (st.read_json("saes", n, "config.json"), st.uri("saes", n), st.read_json("saes", n, "metrics.json") or [])
            for n in st.listdir("saes")
            if st.exists("saes", n, "config.json")
        ]
        analyses = [(self.analysis_record(n).to_json(), st.uri("analyses", n)) for n in self.analysis_names()]
        indexes = [(self.index_record(n).to_json(), st.uri("indexes", n)) for n in self.index_names()]
        self.catalog.rebuild(runs, saes, analyses, indexes)
        return {"runs": len(runs), "saes": len(saes), "analyses": len(analyses), "latent indexes": len(indexes)}

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """One read-only SELECT over the catalog, plus activation tables named ``<table>__<run>``.

        e.g. ``select position, avg(blocks_3_hook_resid_post_norm) from tokens__r1 group by 1``.
        Activation columns named in the SQL are served as float32 lists (DuckDB has no float16).
        The SQL sees nothing else: no files, no other databases, no extensions (saelake.catalog).
        """
        try:
            check_select(sql)
        except CatalogError as e:
            raise UserError(str(e)) from None
        if not self.catalog.path.exists():
            self.sync()
        relations, damaged = {}, []
        for table, run in set(re.findall(r"\b(tokens|contexts)__([A-Za-z0-9_]+)\b", sql)):
            name = next((n for n in self.run_names() if re.sub(r"[^A-Za-z0-9_]", "_", n) == run), None)
            if name is None:
                raise UserError(f"no run {run!r} for {table}__{run}: see `lake ls`")
            relations[f"{table}__{run}"] = self._sql_reader(name, table, sql, damaged)
        # other packages expose their own tables (analyze: features__<analysis>)
        for ep in entry_points(group="saelake.relations"):
            relations.update(ep.load()(self, sql))
        try:
            return self.catalog.query(sql, relations)
        except CatalogError as e:
            raise (damaged[0] if damaged else UserError(str(e))) from None

    def _sql_reader(self, run: str, table: str, sql: str, damaged: list[UserError]):
        """An Arrow reader over one table; a read error is appended to ``damaged`` (DuckDB's message
        for an error inside a scan carries a Python traceback) and raised."""
        import pyarrow as pa

        m = self.manifest(run)
        ds = self.dataset(run, table)
        acts = {m.columns[h]: (m.codec(h), m.d_model[h]) for h in m.hooks}
        wanted = [f.name for f in ds.schema if f.name not in acts or re.search(rf"\b{f.name}\b", sql)]
        scanner = ds.scanner(columns=wanted, batch_size=8192)

        def batches():
            try:
                for b in scanner.to_batches():
                    yield as_float32_for_sql(b, acts)
            except (OSError, pa.ArrowException) as e:  # a damaged data file: name the table, not Lance's internals
                why = re.sub(r",? */rustc/\S*", "", str(e).splitlines()[0])[:160]
                damaged.append(
                    UserError(f"cannot read the {table} table of run {run!r} ({why}): run `lake verify {run}`")
                )
                raise damaged[-1] from None

        batches = batches()
        first = next(batches, None)
        if first is None:
            return pa.table({n: pa.array([], ds.schema.field(n).type) for n in wanted})
        return pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], batches))
