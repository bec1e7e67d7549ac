"""The acceptance run on the real bundled model (slow: `make test-slow`)."""

import json

import lance
import numpy as np
import pytest
import torch

from saelake.lake import Lake, load_model
from tests.conftest import cli

pytestmark = pytest.mark.slow
HOOKS = ["blocks.3.hook_resid_post", "blocks.3.hook_mlp_out"]


def test_smollm2_ingest_matches_transformerlens(tmp_path):
    lake = str(tmp_path / "lake")
    code, out, err = cli(
        "ingest",
        "--lake",
        lake,
        "--model",
        "smollm2-135m",
        "--dataset",
        "builtin",
        "--hooks",
        ",".join(HOOKS),
        "--tokens",
        "20000",
        "--context-size",
        "128",
        "--layout",
        "1d,2d",
        "--run",
        "r1",
        "--quiet",
    )
    assert code == 0, err
    code, out, _ = cli("query", "--lake", lake, "--json", "select * from runs")
    assert json.loads(out)[0]["tokens"] >= 20000
    tokens = lance.dataset(f"{lake}/runs/r1/tokens.lance").to_table()
    contexts = lance.dataset(f"{lake}/runs/r1/contexts.lance").to_table()
    m = Lake(lake).manifest("r1")
    assert tokens.num_rows == m.rows_1d >= 19000
    model = load_model("smollm2-135m")
    ctx = contexts.slice(0, 4)
    toks = torch.tensor(np.stack(ctx.column("tokens").to_numpy(zero_copy_only=False)))
    _, cache = model.bridge.run_with_cache(toks, names_filter=HOOKS, stop_at_layer=4)
    for h in HOOKS:
        stored = np.stack([np.stack(x) for x in ctx.column(m["columns"][h]).to_pylist()]).astype(np.float32)
        ref = cache[h].numpy()
        # float16 storage: relative error ~1e-3 of each value's magnitude
        np.testing.assert_allclose(stored, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
