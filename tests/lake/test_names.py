"""Names are claimed atomically: of several processes taking one name at once exactly one goes on,
on local disk and on S3; the others exit 2 with one line. `lake train/analyze/import --name`."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saelake.lake import UserError
from saelake.lake.storage import CLAIM, LakeStorage, release_unused_claims
from tests.conftest import REPO, cli

H0 = "blocks.0.hook_resid_post"
# Each process imports what it needs, says it is ready and waits for "go": the commands then start
# within a millisecond of each other (interpreter start-up alone differs by seconds on busy cores).
GATE = """
import os, sys, time
from pathlib import Path
from saelake.lake import UserError
from saelake.lake.storage import LakeStorage
gate = Path(sys.argv[1])
(gate / f"ready-{os.getpid()}").touch()
while not (gate / "go").exists():
    time.sleep(0.001)
"""
CLAIM_X = """
try:
    LakeStorage(sys.argv[2]).claim("saes", "x", owner="test")
except UserError as e:
    print("lost:", e)
    sys.exit(2)
LakeStorage(sys.argv[2]).write_json({"name": "x"}, "saes", "x", "config.json")
print("won", os.getpid())
"""
LAKE = "main(sys.argv[2:])"  # the CLI, imported (with its sub-commands) before the gate
LAKE_IMPORTS = """
from saelake.lake.cli import _load_plugins, main
import saelake.analyze.run, saelake.train.interop, saelake.train.trainer
_load_plugins()
"""


def _at_once(code: str, args: list[list[str]], gate: Path, env: dict | None = None) -> list[tuple[int, str, str]]:
    """One process per argument list, running ``code`` at the same moment once all have started."""
    gate.mkdir()
    before = LAKE_IMPORTS if code == LAKE else ""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", before + GATE + code, str(gate), *a],
            cwd=REPO,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for a in args
    ]
    deadline = time.time() + 120
    while (
        len(list(gate.glob("ready-*"))) < len(procs) and time.time() < deadline and all(p.poll() is None for p in procs)
    ):
        time.sleep(0.01)
    (gate / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "lake"), {}
    env = request.getfixturevalue("s3_env")
    return f"s3://{env['bucket']}/lake", {k: v for k, v in env.items() if k.startswith("AWS_")}


def test_one_of_several_processes_takes_a_name(root, tmp_path):
    uri, env = root
    res = _at_once(CLAIM_X, [[uri]] * 3, tmp_path / "gate", env)
    assert sorted(code for code, _, _ in res) == [0, 2, 2], res
    for code, out, _ in res:
        if code == 2:
            assert out.startswith("lost: SAE name 'x' is taken in") and "claimed by `test`" in out, out
    winner = next(out for code, out, _ in res if code == 0)
    held = LakeStorage(uri).read_json("saes", "x", CLAIM)
    assert held["owner"] == "test" and winner == f"won {held['pid']}\n"


def test_a_name_taken_by_a_failed_command_is_given_back(root, monkeypatch):
    """Names this process claimed but wrote nothing else under (it stopped first) are free again;
    release_unused_claims runs at exit and when the CLI reports an error."""
    uri, env = root
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    st = LakeStorage(uri)
    st.claim("saes", "unused", owner="test")
    st.claim("saes", "used", owner="test")
    st.write_json({"name": "used"}, "saes", "used", "config.json")
    with pytest.raises(UserError, match="'used' is taken"):
        st.claim("saes", "used", owner="test")
    release_unused_claims()
    assert st.listdir("saes", "unused") == [] and st.listdir("saes", "used") == [CLAIM, "config.json"]
    st.claim("saes", "unused", owner="test")  # free again
    release_unused_claims()


TRAIN = (
    "--run",
    "r1",
    "--hook",
    H0,
    "--arch",
    "topk",
    "--k",
    "4",
    "--expansion",
    "2",
    "--tokens",
    "4096",
    "--batch-size",
    "256",
    "--repeat",
    "--checkpoint-every",
    "4",
    "--quiet",
)


@pytest.fixture(scope="module")
def lake(tmp_path_factory, tiny_lake) -> str:
    """The tiny lake with a trained SAE ``sae``."""
    root = tmp_path_factory.mktemp("names") / "lake"
    shutil.copytree(tiny_lake, root, ignore=shutil.ignore_patterns("catalog.duckdb*"))
    code, _, err = cli("train", "--lake", str(root), *TRAIN, "--name", "sae")
    assert code == 0, err
    return str(root)


def _one_winner(res, name: str) -> None:
    assert sorted(code for code, _, _ in res) == [0, 2], res
    err = next(e for code, _, e in res if code == 2)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"{name!r} is taken" in err, err


def test_two_trainings_with_one_name_then_resume(lake, tmp_path):
    res = _at_once(LAKE, [["train", "--lake", lake, *TRAIN, "--name", "x", "--stop-after", "4"]] * 2, tmp_path / "g")
    _one_winner(res, "x")
    assert json.loads(Path(lake, "saes", "x", "config.json").read_text())["status"] == "training"
    code, _, err = cli("train", "--lake", lake, *TRAIN, "--name", "x")  # the name stays taken
    assert code == 2 and "'x' is taken" in err, err
    code, _, err = cli("train", "--lake", lake, *TRAIN, "--name", "x", "--resume")  # its owner finishes it
    assert code == 0, err
    assert json.loads(Path(lake, "saes", "x", "config.json").read_text())["status"] == "complete"


def test_two_analyses_with_one_name(lake, tmp_path):
    res = _at_once(
        LAKE, [["analyze", "--lake", lake, "sae", "--quiet", "--tokens", "320", "--name", "a"]] * 2, tmp_path / "g"
    )
    _one_winner(res, "a")
    assert json.loads(Path(lake, "analyses", "a", "analysis.json").read_text())["name"] == "a"


def test_two_imports_with_one_name(lake, tmp_path):
    code, _, err = cli("export", "--lake", lake, "sae", "-o", str(tmp_path / "out"))
    assert code == 0, err
    res = _at_once(LAKE, [["import", "--lake", lake, str(tmp_path / "out"), "--name", "imp"]] * 2, tmp_path / "g")
    _one_winner(res, "imp")
    assert json.loads(Path(lake, "saes", "imp", "config.json").read_text())["status"] == "imported"
