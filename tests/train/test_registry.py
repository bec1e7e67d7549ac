"""The dictionary registry: kinds by name, and a new kind is one new module (no other file changes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from saelake.lake import UserError
from saelake.train import dictionaries
from tests.train.conftest import H1

REPO = Path(__file__).resolve().parents[2]

NEW_KIND = '''
"""A kind the registry has never seen: ReLU of the pre-activations minus a learnable-free shift."""
from dataclasses import dataclass

import torch.nn.functional as F

from saelake.train.dictionaries import register
from saelake.train.dictionaries.base import Options, option
from saelake.train.dictionaries.sae import SAE
from saelake.train.kernels import Codes


@dataclass
class ShiftedOptions(Options):
    shift: float = option(0.5, "Subtracted from the pre-activations before the ReLU")


@register
class ShiftedReLU(SAE):
    name = "shiftedrelu"
    Options = ShiftedOptions

    def encode(self, x, k=None, *, training=False, comm=None):
        pre = self.pre(x) - self.options[0].shift
        return Codes(self.n, x.shape[0], self.d_sae, acts=F.relu(pre), vals=pre)
'''

# runs in a fresh interpreter whose saelake.train is a copy of the package with the new module added
DRIVER = """
import importlib.util, json, sys
import saelake

copy = sys.argv[1]
spec = importlib.util.spec_from_file_location("saelake.train", f"{copy}/__init__.py", submodule_search_locations=[copy])
package = sys.modules["saelake.train"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(package)
from saelake.train import SAEStore, dictionaries as registry
from tests.conftest import cli

lake, hook, out = sys.argv[2], sys.argv[3], sys.argv[4]
res = {"names": list(registry.names()), "help": cli("train", "--help")[1]}
res["train"] = cli("train", "--lake", lake, "--run", "r1", "--hook", hook, "--arch", "shiftedrelu", "--shift", "0.25",
                   "--expansion", "2", "--tokens", "512", "--batch-size", "256", "--normalize", "none",
                   "--lr", "0.003", "--holdout", "0", "--name", "sh", "--quiet")
res["foreign"] = cli("train", "--lake", lake, "--run", "r1", "--hook", hook, "--arch", "shiftedrelu", "--k", "4",
                     "--tokens", "512", "--name", "sh2", "--quiet")
sae, cfg = SAEStore(lake).load("sh")
res["loaded"] = [type(sae).__name__, sae.options[0].shift, cfg["hyperparameters"]["shift"], cfg["arch"]]
res["export"] = cli("export", "--lake", lake, "sh", "-o", out)
print("RESULT" + json.dumps(res))
"""


def test_kinds_by_name():
    assert {"relu", "jumprelu", "topk", "batchtopk"} <= set(dictionaries.names())
    assert dictionaries.get("topk").name == "topk"
    with pytest.raises(UserError, match="unknown dictionary kind .*'gated'.*use one of relu, jumprelu, topk"):
        dictionaries.get("gated")
    assert dictionaries.from_saelens("standard") is dictionaries.get("relu")
    assert dictionaries.from_saelens("gated") is None


def test_a_new_kind_is_one_module(lake_dir, tmp_path):
    """A module added to the package's dictionaries/ folder (in a copy of the package) is trained by
    `lake train --arch`, with its own option on the command line, saved, loaded, and refused by the
    SAELens export: no other file changes."""
    package = tmp_path / "train"
    shutil.copytree(REPO / "train", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "dictionaries" / "shifted.py").write_text(textwrap.dedent(NEW_KIND))
    (tmp_path / "driver.py").write_text(DRIVER)
    p = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(package), lake_dir, H1, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.split("RESULT", 1)[1])
    assert "shiftedrelu" in res["names"]
    assert "shiftedrelu" in res["help"] and "--shift" in res["help"] and "(default 0.5)" in res["help"]
    code, out, err = res["train"]
    assert code == 0 and "sae sh: shiftedrelu" in out, err
    code, _, err = res["foreign"]
    assert code == 2 and err.startswith("error: --k: not an option of --arch shiftedrelu (its options: --shift)"), err
    assert res["loaded"] == ["ShiftedReLU", 0.25, 0.25, "shiftedrelu"]
    code, _, err = res["export"]
    assert code == 2 and "is a shiftedrelu: SAELens has no format for it" in err, err
