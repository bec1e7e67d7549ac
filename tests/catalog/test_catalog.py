"""The DuckDB catalog: upserts, rebuild, read-only queries, concurrent writers."""

import multiprocessing as mp

import pytest

from saelake.catalog import Catalog, CatalogError


def _manifest(name: str, tokens: int = 100) -> dict:
    return {
        "name": name,
        "status": "complete",
        "model": "m",
        "dataset": "d",
        "hooks": ["h"],
        "context_size": 8,
        "dtype": "float16",
        "layouts": ["1d"],
        "tokens": tokens,
        "contexts": tokens // 8,
        "rows_1d": tokens,
        "seed": 0,
        "created": "2026-01-01T00:00:00",
        "updated": "2026-01-01T00:00:00",
        "columns": {"h": "h"},
        "d_model": {"h": 4},
        "versions": [
            {
                "tables": {"tokens": 3},
                "rows": {"tokens": tokens},
                "contexts": tokens // 8,
                "tokens": tokens,
                "tag": "complete-1",
                "created": "2026-01-01T00:00:00",
            }
        ],
        "stats": {
            "h": {"n": tokens, "mean_norm": 1.0, "rms_norm": 1.1, "median_norm": 0.9, "p99_norm": 3.0, "max_norm": 9.0}
        },
    }


def test_upsert_replaces_and_rebuild_restores(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    cat.upsert_run(_manifest("a"), "/x/a")
    cat.upsert_run(_manifest("a", tokens=200), "/x/a")
    cat.upsert_sae(
        {"name": "s", "arch": "topk", "k": 4, "run": "a", "version": 1},
        "/x/s",
        [{"step": 1, "tokens": 10, "name": "fvu", "value": 0.5}],
    )
    assert cat.query("select name, tokens from runs") == (["name", "tokens"], [("a", 200)])
    assert cat.query("select count(*) from snapshots")[1] == [(1,)]
    assert cat.query("select sae, name, value from metrics")[1] == [("s", "fvu", 0.5)]
    cat.rebuild([(_manifest("b"), "/x/b")])
    assert cat.query("select name from runs")[1] == [("b",)]
    assert cat.query("select count(*) from saes")[1] == [(0,)]


def test_query_refuses_writes(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    cat.upsert_run(_manifest("a"), "/x/a")
    for sql in (
        "delete from runs",
        "update runs set tokens = 0",
        "create table t (x int)",
        "with q as (select 1) insert into runs (name) values ('z')",
    ):
        with pytest.raises(CatalogError):
            cat.query(sql)
    assert cat.query("select tokens from runs")[1] == [(100,)]


def _writer(path: str, prefix: str) -> None:
    cat = Catalog(path)
    for i in range(15):
        cat.upsert_run(_manifest(f"{prefix}{i}"), f"/x/{prefix}{i}")


def test_concurrent_writers_wait_for_the_lock(tmp_path):
    path = str(tmp_path / "c.duckdb")
    Catalog(path).upsert_run(_manifest("seed"), "/x")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, p)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert Catalog(path).query("select count(*) from runs")[1] == [(31,)]


def test_query_waits_for_a_writer_in_the_same_process(tmp_path):
    """DuckDB refuses a second connection with other settings while one is open in the process: the
    confined query connection waits for the writer instead of failing."""
    import threading
    import time

    cat = Catalog(tmp_path / "c.duckdb")
    cat.upsert_run(_manifest("a"), "/x/a")
    opened = threading.Event()

    def hold_writer():
        with cat.connect():
            opened.set()
            time.sleep(0.5)

    writer = threading.Thread(target=hold_writer)
    writer.start()
    opened.wait(10)
    assert cat.query("select name from runs")[1] == [("a",)]
    writer.join()
