"""Real training on a real tiny-model snapshot: every architecture, transcoders, crosscoders,
sweeps, the catalog, exact resume, eval with the SAE spliced in, plots."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saelake.lake import Lake, SnapshotSource
from saelake.train import SAEConfig, SAEStore, load_sae, train
from saelake.train.holdout import HOLDOUT_MAX_FRACTION, HOLDOUT_TOKENS, Holdout, heldout_batches, training_batches
from tests.train.conftest import H0, H1, MLP_IN, MLP_OUT, lake_main

REPO = Path(__file__).resolve().parents[2]


def _train(lake, name, arch="topk", tokens=12000, batch_size=256, **kw):
    kw.setdefault("lr", 3e-3)
    kw.setdefault("hooks", [H1])
    cfg = SAEConfig(name=name, arch=arch, expansion=kw.pop("expansion", 4), **kw)
    return train(lake, [cfg], run="r1", tokens=tokens, batch_size=batch_size, repeat=True, progress=False)[0]


@pytest.mark.parametrize("arch,l1", [("topk", None), ("batchtopk", None), ("relu", 0.5), ("jumprelu", 0.05)])
def test_each_architecture_learns(lake_dir, arch, l1):
    cfg = _train(lake_dir, f"s-{arch}", arch, k=8 if arch in ("topk", "batchtopk") else None, l1=l1)
    assert cfg["status"] == "complete" and cfg["tokens_trained"] == 12000
    assert cfg["fvu"] < 0.6, cfg["fvu"]
    assert 0 < cfg["l0"] < 128
    if arch in ("topk", "batchtopk"):
        assert cfg["l0"] == pytest.approx(8, abs=0.5)
    assert cfg["normalization"]["folded"] and cfg["bos_excluded"] is True and cfg["outlier_factor"] == 10.0
    assert "fvu" in cfg["metric_definitions"]
    sae, saved = load_sae(lake_dir, f"s-{arch}")
    assert saved["arch"] == arch and sae.d_sae == 128


@pytest.mark.parametrize("arch,l1", [("topk", None), ("relu", 0.5)])
def test_bf16_autocast_learns_with_float32_weights(lake_dir, arch, l1):
    # the encoder matmul under bf16 autocast (what a GPU run would use); parameters and saved weights stay fp32
    cfg = train(
        lake_dir,
        [
            SAEConfig(
                name=f"bf16-{arch}", arch=arch, expansion=4, k=8 if arch == "topk" else None, l1=l1, lr=3e-3, hooks=[H1]
            )
        ],
        run="r1",
        tokens=12000,
        batch_size=256,
        repeat=True,
        progress=False,
        autocast="bf16",
    )[0]
    assert cfg["training"]["autocast"] == "bf16" and cfg["fvu"] < 0.6, cfg["fvu"]
    assert all(
        w.dtype == torch.float32 and torch.isfinite(w).all()
        for w in SAEStore(lake_dir).weights(f"bf16-{arch}").values()
    )


def test_topk_catalog_show_ls_and_metrics(lake_dir):
    _train(lake_dir, "s1", k=8)
    rows = Lake(lake_dir).query(
        "select name, arch, hook, d_sae, k, run, version, tokens_trained, fvu, status from saes"
    )[1]
    assert rows == [("s1", "topk", H1, 128, 8, "r1", 1, 12000, rows[0][8], "complete")]
    names = {r[0] for r in Lake(lake_dir).query("select distinct name from metrics where sae = 's1'")[1]}
    assert {"loss", "fvu", "l0", "dead_fraction", "lr", "final_fvu"} <= names
    code, out, _ = lake_main("show", "--lake", lake_dir, "s1")
    assert code == 0 and "sae s1  [complete]  topk" in out and "FVU" in out
    code, out, _ = lake_main("show", "--lake", lake_dir, "s1", "--json")
    assert json.loads(out)["k"] == 8
    code, out, _ = lake_main("ls", "--lake", lake_dir)
    assert "saes:" in out and "s1" in out


def test_transcoder_and_crosscoder(lake_dir):
    tc = _train(lake_dir, "tc", hooks=[MLP_IN], out_hooks=[MLP_OUT], k=8, lr=1e-2)
    assert tc["hook"] == MLP_IN and tc["out_hook"] == MLP_OUT and not tc["apply_b_dec_to_input"]
    assert tc["fvu"] < 0.6
    cc = _train(lake_dir, "cc", hooks=[H0, H1], k=8)
    assert cc["d_in"] == 64 and cc["d_sae"] == 256 and cc["fvu"] < 0.6
    w = SAEStore(lake_dir).weights("cc")
    assert w["W_enc"].shape == (64, 256) and w["W_dec"].shape == (256, 64)


def test_k_annealing_and_auxk_run(lake_dir):
    # dead_window one batch: some latents are dead at some step, so AuxK's loss is used
    cfg = _train(lake_dir, "ka", k=4, k_start=32, k_anneal=0.5, dead_window=256, tokens=6000)
    ks = [r["value"] for r in SAEStore(lake_dir).metrics("ka") if r["name"] == "k"]
    assert ks[0] == 32 and ks[-1] == 4
    assert any(r["name"] == "aux_loss" and r["value"] > 0 for r in SAEStore(lake_dir).metrics("ka"))
    assert cfg["l0"] == pytest.approx(4, abs=0.2)


SWEEP = f"""
run = "r1"
hook = "{H1}"
tokens = 8000
batch_size = 256
repeat = true
lr = 0.003
[[sae]]
arch = "topk"
k = 8
expansion = 4
[[sae]]
arch = "topk"
k = 4
expansion = 4
[[sae]]
arch = "jumprelu"
expansion = 4
l1 = 0.05
[[sae]]
name = "wide"
arch = "topk"
k = 8
expansion = 8
"""


def test_sweep_registers_every_sae_from_one_pass(lake_dir, tmp_path):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    code, out, err = lake_main("train", "--lake", lake_dir, "--config", str(tmp_path / "sweep.toml"), "--quiet")
    assert code == 0, err
    names = sorted(r[0] for r in Lake(lake_dir).query("select name from saes")[1])
    assert names == ["sweep-1", "sweep-2", "sweep-3", "wide"]
    store = SAEStore(lake_dir)
    # the two same-shape TopK SAEs were stacked and stepped together
    assert store.config("sweep-1")["training"]["stacked_with"] == ["sweep-1", "sweep-2"]
    assert store.config("wide")["training"]["stacked_with"] == ["wide"]
    assert store.config("sweep-2")["l0"] == pytest.approx(4, abs=0.3)
    code, out, _ = lake_main("plot", "--lake", lake_dir, "--pareto", *names, "-o", str(tmp_path / "pareto.png"))
    assert code == 0 and (tmp_path / "pareto.png").stat().st_size > 10000
    code, out, _ = lake_main("plot", "--lake", lake_dir, "sweep-1", "-o", str(tmp_path / "curves.png"))
    assert code == 0 and (tmp_path / "curves.png").stat().st_size > 10000


def test_stacked_sweep_equals_separate_runs(lake_dir):
    common = dict(run="r1", tokens=3328, batch_size=256, progress=False)  # no --repeat: within the training rows
    a = [SAEConfig(hooks=[H1], name=f"st{k}", k=k, expansion=4, lr=3e-3, seed=k) for k in (4, 8)]
    train(lake_dir, a, **common)
    for k in (4, 8):
        train(lake_dir, [SAEConfig(hooks=[H1], name=f"sep{k}", k=k, expansion=4, lr=3e-3, seed=k)], **common)
        w1, w2 = SAEStore(lake_dir).weights(f"st{k}"), SAEStore(lake_dir).weights(f"sep{k}")
        for key in w1:
            torch.testing.assert_close(w1[key], w2[key], atol=1e-4, rtol=1e-3)


def _cli_train(lake, name, *extra, env=None):
    args = [
        sys.executable,
        "-m",
        "saelake.lake",
        "train",
        "--lake",
        lake,
        "--run",
        "r1",
        "--hook",
        H1,
        "--arch",
        "topk",
        "--k",
        "8",
        "--expansion",
        "4",
        "--tokens",
        "8192",
        "--batch-size",
        "256",
        "--repeat",
        "--lr",
        "0.003",
        "--checkpoint-every",
        "4",
        "--name",
        name,
        "--quiet",
        *extra,
    ]
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_resume_is_bitwise_exact(lake_dir):
    full = _cli_train(lake_dir, "full")
    assert full.returncode == 0, full.stderr
    stop = _cli_train(lake_dir, "cut", "--stop-after", "12")
    assert stop.returncode == 0 and "interrupted at step 12" in stop.stdout, stop.stdout + stop.stderr
    assert SAEStore(lake_dir).config("cut")["status"] == "training"
    res = _cli_train(lake_dir, "cut", "--resume")
    assert res.returncode == 0, res.stderr
    a, b = SAEStore(lake_dir).weights("full"), SAEStore(lake_dir).weights("cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the curves have one row per logged step, no duplicates from the resumed part
    steps = [r["step"] for r in SAEStore(lake_dir).metrics("cut") if r["name"] == "loss"]
    assert steps == sorted(set(steps))


def test_resume_after_sigkill(lake_dir):
    """A real kill -9 after a checkpoint, then --resume: same weights as an uninterrupted run."""
    ref = _cli_train(lake_dir, "ref", "--checkpoint-every", "2")
    assert ref.returncode == 0, ref.stderr
    args = [
        sys.executable,
        "-m",
        "saelake.lake",
        "train",
        "--lake",
        lake_dir,
        "--run",
        "r1",
        "--hook",
        H1,
        "--k",
        "8",
        "--expansion",
        "4",
        "--tokens",
        "8192",
        "--batch-size",
        "256",
        "--repeat",
        "--lr",
        "0.003",
        "--checkpoint-every",
        "2",
        "--name",
        "killed",
        "--quiet",
    ]
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SAELAKE_TRAIN_SLOW": "0.05"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = Path(lake_dir) / "saes" / "killed" / "checkpoints" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists()
    res = _cli_train(lake_dir, "killed", "--checkpoint-every", "2", "--resume")
    assert res.returncode == 0, res.stderr
    a, b = SAEStore(lake_dir).weights("ref"), SAEStore(lake_dir).weights("killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_splices_the_sae_into_the_model(lake_dir):
    _train(lake_dir, "ev", k=8)
    _train(lake_dir, "evtc", hooks=[MLP_IN], out_hooks=[MLP_OUT], k=8)
    for name in ("ev", "evtc"):
        code, out, err = lake_main("eval", "--lake", lake_dir, name, "--tokens", "1024", "--json")
        assert code == 0, err
        res = json.loads(out)
        assert res["tokens"] >= 1024 and res["bos_excluded"] is True
        assert 0 < res["fvu"] < 1 and res["l0"] == pytest.approx(8, abs=0.5)
        assert all(res[k] > 0 for k in ("ce_clean", "ce_sae", "ce_zero_ablation"))  # a random model: no order
        assert res["kl"] >= 0 and res["delta_lm_loss"] == pytest.approx(res["ce_sae"] - res["ce_clean"])
        assert res["ce_loss_recovered"] is not None and "ce_loss_recovered" in res["definitions"]
    rows = Lake(lake_dir).query("select name, value from metrics where sae = 'ev' and name like 'eval_%'")[1]
    assert {r[0] for r in rows} >= {"eval_fvu", "eval_l0", "eval_ce_loss_recovered", "eval_kl"}
    assert SAEStore(lake_dir).config("evtc")["eval"]["tokens"] == res["tokens"]


def test_live_training(lake_dir, snapshot):
    cfg = train(
        lake_dir,
        [SAEConfig(hooks=[H1], name="live", k=8, expansion=4, lr=3e-3)],
        live=True,
        model=snapshot["model"],
        dataset=snapshot["corpus"],
        context_size=32,
        tokens=4096,
        batch_size=256,
        progress=False,
    )[0]
    assert cfg["source"] == "live" and cfg["run"] is None and cfg["fvu"] < 0.8
    # live: the first 10% of --tokens (409) of the stream are held out, training starts after them
    assert cfg["holdout"]["tokens"] == 409 and cfg["holdout"]["tokens_evaluated"] > 0
    assert 0 < cfg["heldout_fvu"] < 1 and cfg["heldout_l0"] == pytest.approx(8, abs=0.5)
    assert cfg["normalization"]["hooks"][H1]["origin"] == "first live batch"


def test_holdout_rows_are_never_trained_on_and_reported(lake_dir):
    """--repeat over ~3.5k training rows for 12k tokens: each training row seen ~3.4 times; the
    held-out rows (the snapshot's last rows) never, and the final numbers on them are reported."""
    code, out, err = lake_main(
        "train",
        "--lake",
        lake_dir,
        "--run",
        "r1",
        "--hook",
        H1,
        "--arch",
        "topk",
        "--k",
        "8",
        "--expansion",
        "4",
        "--tokens",
        "12000",
        "--batch-size",
        "256",
        "--repeat",
        "--lr",
        "0.003",
        "--outlier-factor",
        "0",
        "--name",
        "h",
        "--quiet",
    )
    assert code == 0, err
    cfg = SAEStore(lake_dir).config("h")
    src = SnapshotSource(lake_dir, "r1")
    n, held = src.n_tokens, cfg["holdout"]
    assert held["tokens"] == min(HOLDOUT_TOKENS, int(n * HOLDOUT_MAX_FRACTION)) > 0
    assert held["rows"] == [n - held["tokens"], n] and held["tokens_evaluated"] == held["tokens"]
    m = re.search(
        r"held-out \((\d+) tokens\) FVU ([\d.]+), L0 ([\d.]+), dead ([\d.]+); "
        r"train FVU \(in-sample\) ([\d.]+)",
        out,
    )
    assert m and int(m[1]) == held["tokens"], out
    # the trainer's stream (same functions, same arguments) never reads a held-out row
    plan = Holdout(held["tokens"], tuple(held["rows"]), n)
    trained, seen = set(), 0
    for b in training_batches(src, plan, 256, [H1], seed=0, start=0, repeat=True, shard=(0, 1)):
        trained |= set(zip(b.context_id.tolist(), b.position.tolist()))
        seen += len(b)
        if seen >= 12000:
            break
    held_rows, acts = [], []
    for b in heldout_batches(src, plan, 256, [H1], seed=0):
        held_rows += zip(b.context_id.tolist(), b.position.tolist())
        acts.append(b.acts[H1].float())
    assert len(held_rows) == len(set(held_rows)) == held["tokens"]
    assert trained.isdisjoint(held_rows) and len(trained) == n - held["tokens"]  # every training row, none held out
    # the held-out FVU is the saved SAE's on exactly those rows (one hook: raw and normalised FVU agree)
    sae, _ = load_sae(lake_dir, "h")
    x = torch.cat(acts)
    with torch.no_grad():
        fvu = float((x - sae.decode(sae.encode(x))[0]).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert held["fvu"] == pytest.approx(fvu, rel=1e-4) and held["l0"] == pytest.approx(8, abs=0.5)
    # and it is not the in-sample number (training rows seen ~3.4 times)
    assert cfg["heldout_fvu"] == held["fvu"] and abs(cfg["heldout_fvu"] - cfg["fvu"]) > 1e-3, (held, cfg["fvu"])
    assert "in-sample" in cfg["final_metrics"]["window"]
    row = Lake(lake_dir).query("select fvu, heldout_fvu, heldout_l0, heldout_dead_fraction from saes")[1][0]
    assert row == pytest.approx((cfg["fvu"], held["fvu"], held["l0"], held["dead_fraction"]))
    names = {r["name"] for r in SAEStore(lake_dir).metrics("h")}
    assert {"heldout_fvu", "heldout_l0", "heldout_dead_fraction", "final_fvu"} <= names
    code, out, _ = lake_main("show", "--lake", lake_dir, "h")
    assert code == 0 and f"  held-out ({held['tokens']} tokens) FVU" in out and "train (in-sample)  FVU" in out
    code, out, _ = lake_main("ls", "--lake", lake_dir)
    assert code == 0 and "heldout_fvu" in out and "train_fvu_in_sample" in out and "complete" in out


def test_holdout_option(lake_dir):
    base = [
        "train",
        "--lake",
        lake_dir,
        "--run",
        "r1",
        "--hook",
        H1,
        "--k",
        "4",
        "--expansion",
        "2",
        "--batch-size",
        "256",
        "--quiet",
    ]
    n = SnapshotSource(lake_dir, "r1").n_tokens
    code, out, err = lake_main(*base, "--tokens", "512", "--holdout", "0", "--name", "none")
    assert code == 0, err
    cfg = SAEStore(lake_dir).config("none")
    assert cfg["holdout"]["tokens"] == 0 and cfg["heldout_fvu"] is None and "no held-out tokens" in out
    code, out, err = lake_main(*base, "--tokens", "512", "--holdout", "100", "--name", "some")
    assert code == 0 and "held-out (100 tokens)" in out, err
    assert SAEStore(lake_dir).config("some")["holdout"]["rows"] == [n - 100, n]
    for args, message in [
        (["--holdout", "-1"], "--holdout is a number of tokens"),
        (["--holdout", str(n)], "leaves nothing to train on"),
        (["--holdout", "1000", "--tokens", str(n - 500)], "1000 held out (--holdout)"),
    ]:
        code, _, err = lake_main(*base, "--tokens", "512", *args, "--name", "bad")
        assert code == 2 and message in err and err.count("\n") == 1, err
