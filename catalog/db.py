"""The DuckDB catalog: an index over a lake's manifests.

Manifests in the lake are the source of truth; everything here can be rebuilt from them
(``rebuild``). Writers hold DuckDB's file lock briefly and retry. ``query`` runs user SQL
confined to the catalog and the relations it is given: one SELECT statement, on a read-only
connection whose access to files, other databases and extensions is switched off and locked.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb

SCHEMA = """
create table if not exists runs (
    name varchar primary key, status varchar, model varchar, dataset varchar, hooks varchar[],
    context_size integer, dtype varchar, layouts varchar[], tokens bigint, contexts bigint,
    rows_1d bigint, seed bigint, n_versions integer, created timestamp, updated timestamp,
    uri varchar, manifest json);
create table if not exists snapshots (
    run varchar, "table" varchar, version bigint, contexts bigint, tokens bigint, rows bigint,
    tag varchar, created timestamp, primary key (run, "table", version));
create table if not exists hooks (
    run varchar, hook varchar, "column" varchar, d_model integer, n bigint, mean_norm double,
    rms_norm double, median_norm double, p99_norm double, max_norm double, primary key (run, hook));
create table if not exists saes (
    name varchar primary key, arch varchar, hook varchar, out_hook varchar, d_in integer,
    d_sae integer, k integer, run varchar, version bigint, tokens_trained bigint, fvu double,
    l0 double, dead_fraction double, status varchar, created timestamp, uri varchar, config json,
    heldout_fvu double, heldout_l0 double, heldout_dead_fraction double);
-- fvu, l0, dead_fraction: in-sample (training batches); heldout_*: on rows training never read
alter table saes add column if not exists heldout_fvu double;
alter table saes add column if not exists heldout_l0 double;
alter table saes add column if not exists heldout_dead_fraction double;
create table if not exists metrics (
    sae varchar, step bigint, tokens bigint, name varchar, value double);
create table if not exists analyses (
    name varchar primary key, sae varchar, run varchar, version bigint, store varchar,
    n_features integer, tokens bigint, created timestamp, uri varchar, config json);
create table if not exists latent_indexes (
    name varchar primary key, sae varchar, run varchar, version bigint, status varchar,
    contexts bigint, tokens bigint, entries bigint, created timestamp, uri varchar, record json);
"""

# What user SQL may do is decided by the database, not by reading the text: DuckDB refuses file
# access (read_text, read_csv, glob, COPY, EXPORT), ATTACH and extension INSTALL/LOAD once external
# access is off, and lock_configuration stops a statement from switching it back on. Registered
# Arrow objects (the lake's own relations) are not external, so they keep working.
CONFINED = {
    "enable_external_access": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "python_enable_replacements": False,  # no scanning of Python variables by name
    "lock_configuration": True,
}


# the saes table's scalar columns, in order (train fills an SAE config with them)
SAE_COLUMNS = (
    "name",
    "arch",
    "hook",
    "out_hook",
    "d_in",
    "d_sae",
    "k",
    "run",
    "version",
    "tokens_trained",
    "fvu",
    "l0",
    "dead_fraction",
    "status",
    "created",
    "heldout_fvu",
    "heldout_l0",
    "heldout_dead_fraction",
)


class CatalogError(Exception):
    pass


class Catalog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @contextmanager
    def connect(self, read_only: bool = False, timeout_s: float = 30.0, confined: bool = False):
        """A connection, retrying while another process holds the write lock.

        ``confined``: read-only, with the CONFINED settings (for user SQL)."""
        read_only = read_only or confined
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if read_only and not self.path.exists():
            with self.connect():
                pass
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only, config=CONFINED if confined else {})
                break
            except (duckdb.IOException, duckdb.ConnectionException) as e:
                # another process holds the write lock, or this one has the file open with other
                # settings (a writer while a confined query starts): both are brief
                busy = "lock" in str(e).lower() or "different configuration" in str(e)
                if not busy or time.monotonic() > deadline:
                    raise CatalogError(f"catalog {self.path} is busy or unreadable: {e}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        try:
            if not read_only:
                con.execute(SCHEMA)
            yield con
        finally:
            con.close()

    # -- writes ----------------------------------------------------------------------------
    def upsert_run(self, manifest: dict, uri: str, con=None) -> None:
        if con is None:
            with self.connect() as con:
                return self.upsert_run(manifest, uri, con)
        m = manifest
        name = m["name"]
        con.execute("begin")
        for table in ("runs", "snapshots", "hooks"):
            con.execute(f"delete from {table} where {'name' if table == 'runs' else 'run'} = ?", [name])
        con.execute(
            "insert into runs values (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                name,
                m["status"],
                m["model"],
                m["dataset"],
                m["hooks"],
                m["context_size"],
                m["dtype"],
                m["layouts"],
                m["tokens"],
                m["contexts"],
                m.get("rows_1d", 0),
                m["seed"],
                len(m["versions"]),
                m["created"],
                m["updated"],
                uri,
                json.dumps(m),
            ],
        )
        for v in m["versions"]:
            for table, version in v["tables"].items():
                con.execute(
                    "insert into snapshots values (?,?,?,?,?,?,?,?)",
                    [
                        name,
                        table,
                        version,
                        v["contexts"],
                        v["tokens"],
                        v["rows"].get(table),
                        v.get("tag"),
                        v["created"],
                    ],
                )
        for hook, s in m.get("stats", {}).items():
            con.execute(
                "insert into hooks values (?,?,?,?,?,?,?,?,?,?)",
                [
                    name,
                    hook,
                    m["columns"][hook],
                    m["d_model"][hook],
                    s["n"],
                    s["mean_norm"],
                    s["rms_norm"],
                    s["median_norm"],
                    s["p99_norm"],
                    s["max_norm"],
                ],
            )
        con.execute("commit")

    def upsert_sae(self, config: dict, uri: str, metrics: list[dict] | None = None, con=None) -> None:
        """One SAE: ``config`` holds the ``saes`` columns (missing ones are NULL) and is kept whole
        as JSON; ``metrics`` rows are {step, tokens, name, value} and replace earlier ones."""
        if con is None:
            with self.connect() as con:
                return self.upsert_sae(config, uri, metrics, con)
        cols = list(SAE_COLUMNS)
        con.execute("begin")
        con.execute("delete from saes where name = ?", [config["name"]])
        con.execute(
            f"insert into saes ({', '.join(cols)}, uri, config) values ({','.join('?' * (len(cols) + 2))})",
            [config.get(c) for c in cols] + [uri, json.dumps(config, default=str)],
        )
        if metrics is not None:
            con.execute("delete from metrics where sae = ?", [config["name"]])
        if metrics:
            con.executemany(
                "insert into metrics values (?,?,?,?,?)",
                [[config["name"], r["step"], r["tokens"], r["name"], r["value"]] for r in metrics],
            )
        con.execute("commit")

    def upsert_analysis(self, record: dict, uri: str, con=None) -> None:
        """One analysis: ``record`` holds the ``analyses`` columns and is kept whole as JSON."""
        if con is None:
            with self.connect() as con:
                return self.upsert_analysis(record, uri, con)
        cols = ["name", "sae", "run", "version", "store", "n_features", "tokens", "created"]
        con.execute("begin")
        con.execute("delete from analyses where name = ?", [record["name"]])
        con.execute(
            f"insert into analyses values ({','.join('?' * (len(cols) + 2))})",
            [record.get(c) for c in cols] + [uri, json.dumps(record, default=str)],
        )
        con.execute("commit")

    def upsert_latent_index(self, record: dict, uri: str, con=None) -> None:
        """One latent index (``lake encode``); ``record`` is kept whole as JSON."""
        if con is None:
            with self.connect() as con:
                return self.upsert_latent_index(record, uri, con)
        con.execute("begin")
        con.execute("delete from latent_indexes where name = ?", [record["name"]])
        con.execute(
            "insert into latent_indexes values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                record["name"],
                record["sae"],
                record["run"],
                record["version"],
                record["status"],
                record["contexts_done"],
                record["tokens"],
                record["entries"],
                record["created"],
                uri,
                json.dumps(record, default=str),
            ],
        )
        con.execute("commit")

    def rebuild(
        self,
        runs: list[tuple[dict, str]],
        saes: list[tuple[dict, str, list]] = (),
        analyses: list[tuple[dict, str]] = (),
        indexes: list[tuple[dict, str]] = (),
    ) -> None:
        """Drop the index and rebuild it from the lake's manifests.

        runs: (manifest, uri); saes: (config, uri, metrics); analyses and indexes: (record, uri)."""
        with self.connect() as con:
            for table in ("runs", "snapshots", "hooks", "saes", "metrics", "analyses", "latent_indexes"):
                con.execute(f"delete from {table}")
            for manifest, uri in runs:
                self.upsert_run(manifest, uri, con)
            for config, uri, metrics in saes:
                self.upsert_sae(config, uri, metrics, con)
            for record, uri in analyses:
                self.upsert_analysis(record, uri, con)
            for record, uri in indexes:
                self.upsert_latent_index(record, uri, con)

    # -- reads -----------------------------------------------------------------------------
    def query(self, sql: str, relations: dict | None = None) -> tuple[list[str], list[tuple]]:
        """One read-only SELECT over the catalog, confined to it (see CONFINED).

        ``relations`` are extra named Arrow readers (activation tables)."""
        check_select(sql)
        with self.connect(confined=True) as con:
            for name, rel in (relations or {}).items():
                con.register(name, rel)
            try:  # rows are produced while fetching: a damaged relation fails there
                cur = con.execute(sql)
                return [d[0] for d in cur.description], cur.fetchall()
            except duckdb.Error as e:
                raise CatalogError(f"SQL error: {str(e).splitlines()[0]}") from None


def check_select(sql: str) -> None:
    """Exactly one statement, and a SELECT (also WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise CatalogError(f"SQL error: {str(e).splitlines()[0]}") from None
    if len(statements) != 1:
        raise CatalogError(f"lake query runs exactly one statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise CatalogError(
            f"lake query is read-only: only SELECT-like statements (SELECT, WITH, FROM, DESCRIBE, "
            f"SHOW, SUMMARIZE), not {kind.name}"
        )
