"""`lake query` is read-only and sees only the lake: each attack gets one line and exit 2, and
changes nothing; the lake's own relations (catalog, tokens__/contexts__/features__) keep working."""

import json
import shutil
from pathlib import Path

import pytest

from saelake.catalog import Catalog
from tests.analyze.conftest import H0, make_sae
from tests.conftest import cli


def _listing(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "catalog.duckdb" not in p.name
    }


@pytest.fixture(scope="module")
def lake(tmp_path_factory, tiny_lake) -> Path:
    """A copy of the tiny lake (run r1)."""
    root = tmp_path_factory.mktemp("query") / "lake"
    shutil.copytree(tiny_lake, root, ignore=shutil.ignore_patterns("catalog.duckdb*"))
    code, _, err = cli("catalog", "sync", "--lake", str(root))
    assert code == 0, err
    return root


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """Another lake's catalog, with one run in it."""
    path = tmp_path_factory.mktemp("other") / "catalog.duckdb"
    with Catalog(path).connect() as con:
        con.execute("insert into runs (name, status) values ('theirs', 'complete')")
    return path


ONE = "exactly one statement"
FILES = "file system operations are disabled"
# sql -> what the refusal says. The first word of a statement proves nothing: several attacks hide
# behind a harmless first statement or a comment (the old check read only the first word).
ATTACKS = {
    "copy after select": ("select 1; copy (select 'x') to '{lake}/runs/r1/manifest.json'", ONE),
    "attach after select": ("select 1; attach '{other}' as o (READ_WRITE); delete from o.runs", ONE),
    "attach behind a comment": ("/* hi */ attach '{other}' as o", "not ATTACH"),
    "read_text": ("select * from read_text('/etc/passwd')", FILES),
    "read_csv": ("select * from read_csv('{lake}/runs/r1/manifest.json')", FILES),
    "read_blob": ("select * from read_blob('/etc/passwd')", FILES),
    "glob": ("select * from glob('{lake}/runs/*')", FILES),
    "file as table": ("select * from '{secret}'", "secret.csv"),
    "pragma": ("/* note */ pragma database_list", "not PRAGMA"),
    "pragma after select": ("select 1; pragma enable_profiling", ONE),
    "install": ("install httpfs", "not LOAD"),
    "install after select": ("select 1; install httpfs", ONE),
    "load": ("load httpfs", "not LOAD"),
    "set external access": ("set enable_external_access = true", "not SET"),
    "reset external access": ("reset enable_external_access", "not SET"),
    "copy": ("/* x */ copy (select 'x') to '{lake}/runs/r1/manifest.json'", "not COPY"),
    "copy from": ("copy runs from '/etc/passwd'", "not COPY"),
    "create table": ("/* x */ create temp table t as select 1", "not CREATE"),
    "insert via with": ("with q as (select 1) insert into runs (name) values ('z')", "not INSERT"),
    "export database": ("export database '{lake}/exported'", "not EXPORT"),
    "two selects": ("select 1; select 2", ONE),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_is_refused_and_changes_nothing(attack, lake, other, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("root:x:0:0\n")
    sql, refusal = ATTACKS[attack]
    before = _listing(lake)
    code, out, err = cli("query", "--lake", str(lake), sql.format(lake=lake, other=other, secret=secret))
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert refusal in err, err
    assert "root:" not in out + err  # /etc/passwd (or the secret) was not read
    assert _listing(lake) == before  # manifest and every other file as they were
    assert json.loads((lake / "runs" / "r1" / "manifest.json").read_text())["name"] == "r1"
    assert Catalog(other).query("select name from runs")[1] == [("theirs",)]
    assert not (lake / "exported").exists()


def test_the_lake_relations_keep_working(lake):
    code, out, err = cli("query", "--lake", str(lake), "--json", "select name, status from runs")
    assert code == 0, err
    assert json.loads(out) == [{"name": "r1", "status": "complete"}]
    sql = (
        "with t as (select count(*) n, avg(list_sum(blocks_0_hook_resid_post)) s from tokens__r1), "
        "c as (select count(*) n from contexts__r1) select t.n tokens, t.s is not null acts, c.n contexts from t, c"
    )
    code, out, err = cli("query", "--lake", str(lake), "--json", sql)
    assert code == 0, err
    row = list(json.loads(out)[0].values())
    manifest = json.loads((lake / "runs" / "r1" / "manifest.json").read_text())
    assert row == [manifest["rows_1d"], True, manifest["contexts"]]
    for sql in ("describe runs", "show tables", "summarize saes", "from analyses select name"):
        code, out, err = cli("query", "--lake", str(lake), sql)
        assert code == 0, (sql, err)


def test_feature_tables_keep_working(lake, tmp_path, tiny_model):
    root = tmp_path / "lake"
    shutil.copytree(lake, root)
    make_sae(str(root), "s1", "topk", H0, model=tiny_model)
    code, _, err = cli("analyze", "--lake", str(root), "s1", "--quiet", "--tokens", "320", "--name", "a-1")
    assert code == 0, err
    code, out, err = cli(
        "query", "--lake", str(root), "--json", "select count(*) n, max(density) <= 1 ok from features__a_1"
    )
    assert code == 0, err
    assert json.loads(out) == [{"n": 64, "ok": True}]


def test_truncated_data_file_is_one_line(lake, tmp_path):
    """Whichever fragment is damaged (the first read here, or one DuckDB reads mid-scan)."""
    n_files = len(list((lake / "runs" / "r1" / "tokens.lance" / "data").iterdir()))
    assert n_files > 1
    for i in range(n_files):
        root = tmp_path / f"lake{i}"
        shutil.copytree(lake, root)
        data = sorted((root / "runs" / "r1" / "tokens.lance" / "data").iterdir())[i]
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        code, out, err = cli("query", "--lake", str(root), "select sum(position) from tokens__r1")
        assert code == 2, (code, out, err)
        assert err.startswith("error: cannot read the tokens table of run 'r1'"), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "rustc" not in err, err
