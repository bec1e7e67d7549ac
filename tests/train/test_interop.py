"""SAELens export/import: the exported files, read by an independent NumPy implementation on raw
activations from tokens.lance, reproduce the trained SAE (thresholds included)."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from saelake.lake import SnapshotSource
from saelake.train import SAEConfig, SAEStore, load_sae, train
from tests.train.conftest import H1, MLP_IN, MLP_OUT, lake_main


def numpy_sae(folder: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens semantics, written from the format only: returns (x_hat, latents)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["normalize_activations"] == "none"
    x_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = x_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        f = np.maximum(pre, 0)
    elif cfg["architecture"] == "jumprelu":
        f = np.maximum(pre, 0) * (pre > w["threshold"])
    else:
        k = cfg["k"]
        idx = np.argpartition(-pre, k - 1, axis=1)[:, :k]
        f = np.zeros_like(pre)
        np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    return f @ w["W_dec"] + w["b_dec"], f


def raw_acts(lake: str, hook: str) -> np.ndarray:
    src = SnapshotSource(lake, "r1")
    ds = lance.dataset(src.lake.table_uri("r1", "tokens"))
    col = ds.to_table(columns=[src.columns[hook]]).column(0).combine_chunks()
    return col.flatten().to_numpy().astype(np.float32).reshape(len(col), -1)


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("topk", {"k": 8}),
        ("batchtopk", {"k": 8}),
        ("relu", {"l1": 0.5}),
        ("jumprelu", {"l1": 0.05}),
        ("transcoder", {"k": 8}),
    ],
)
def test_export_matches_trained_sae_on_raw_activations(lake_dir, tmp_path, arch, kw):
    hooks, out_hooks = ([MLP_IN], [MLP_OUT]) if arch == "transcoder" else ([H1], None)
    kind = "topk" if arch == "transcoder" else arch
    train(
        lake_dir,
        [
            SAEConfig(
                hooks=hooks,
                out_hooks=out_hooks,
                name="s",
                arch=kind,
                expansion=4,
                lr=1e-2 if arch == "transcoder" else 3e-3,
                **kw,
            )
        ],
        run="r1",
        tokens=8000,
        batch_size=256,
        repeat=True,
        progress=False,
    )
    code, _, err = lake_main("export", "--lake", lake_dir, "s", "--format", "saelens", "-o", str(tmp_path / "out"))
    assert code == 0, err
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["d_sae"] == 128 and cfg["hook_name"] == hooks[0]
    assert cfg["normalize_activations"] == "none" and "apply_b_dec_to_input" in cfg
    x = raw_acts(lake_dir, hooks[0])
    y = raw_acts(lake_dir, (out_hooks or hooks)[0])
    y_np, f_np = numpy_sae(tmp_path / "out", x)
    sae, saved = load_sae(lake_dir, "s")
    with torch.no_grad():
        y_t = sae(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(y_np, y_t, atol=1e-4 * np.abs(y).max(), rtol=1e-3)
    fvu_np = ((y - y_np) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert fvu_np == pytest.approx(saved["fvu"], abs=0.1)
    if arch in ("topk", "transcoder"):
        assert (f_np > 0).sum(1).max() <= 8
    # import the export back: same weights, same outputs, registered
    code, _, err = lake_main("import", "--lake", lake_dir, str(tmp_path / "out"), "--name", "back")
    assert code == 0, err
    w1, w2 = SAEStore(lake_dir).weights("s"), SAEStore(lake_dir).weights("back")
    assert all(torch.equal(w1[k], w2[k]) for k in w2)
    back, bcfg = load_sae(lake_dir, "back")
    assert bcfg["arch"] == saved["arch"] and bcfg["status"] == "imported"
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.from_numpy(x))[0].numpy(), y_t, atol=1e-6)
