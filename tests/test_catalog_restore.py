"""The catalog is an index: delete it, `lake catalog sync` restores every run, SAE and analysis."""

import shutil

from tests.conftest import HOOKS, cli


def test_catalog_sync_restores_runs_saes_and_analyses(tmp_path, tiny_lake):
    from saelake.analyze import AnalyzeConfig, analyze
    from saelake.train import SAEConfig, train

    lake = tmp_path / "lake"
    shutil.copytree(tiny_lake, lake)
    assert cli("catalog", "sync", "--lake", str(lake))[0] == 0  # the copy's catalog still names the old path
    train(
        str(lake),
        [
            SAEConfig(hooks=[HOOKS[0]], arch="topk", k=4, expansion=2, name="s1"),
            SAEConfig(hooks=[HOOKS[0]], arch="relu", expansion=2, name="s2"),
        ],
        progress=False,
        run="r1",
        tokens=3000,
        batch_size=256,
    )
    analyze(AnalyzeConfig(lake=str(lake), sae="s1", tokens=640), progress=False)
    tables = ("runs", "snapshots", "hooks", "saes", "metrics", "analyses")

    def dump():
        out = {}
        for t in tables:
            code, text, err = cli("query", "--lake", str(lake), "--json", f"select * from {t} order by all")
            assert code == 0, err
            out[t] = text
        return out

    before = dump()
    assert '"s1"' in before["saes"] and '"s2"' in before["saes"] and '"s1"' in before["analyses"]
    assert before["metrics"].count('"name"') > 4
    (lake / "catalog.duckdb").unlink()
    code, out, _ = cli("catalog", "sync", "--lake", str(lake))
    assert code == 0 and "1 runs, 2 saes, 1 analyses" in out
    after = dump()
    for t in tables:
        assert after[t] == before[t], t
