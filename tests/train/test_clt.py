"""Cross-layer transcoders: the math is the definition, training from one snapshot or live, FVU per output
layer, save/load, resume, sweeps, analysis."""

from __future__ import annotations

import shutil

import pytest
import torch

from saelake.lake import SnapshotSource
from saelake.lake.hooknames import expand_hooks
from saelake.train import SAEStore, dictionaries
from tests.train.conftest import lake_main

IN = "blocks.{0-1}.ln2.hook_out"
OUT = "blocks.{0-1}.hook_mlp_out"
INS, OUTS = expand_hooks([IN]), expand_hooks([OUT])


@pytest.fixture(scope="module")
def clt_lake(tiny_model, tiny_corpus, tmp_path_factory):
    """One ingest holding every layer's MLP input and output (2 layers), 1d + 2d."""
    from saelake.lake import IngestConfig, ingest

    root = str(tmp_path_factory.mktemp("cltlake") / "lake")
    ingest(
        IngestConfig(
            lake=root,
            model=tiny_model,
            dataset=tiny_corpus,
            hooks=INS + OUTS,
            tokens=3000,
            context_size=32,
            layouts=["1d", "2d"],
            run="r",
        ),
        progress=False,
    )
    return root


@pytest.fixture
def lake(clt_lake, tmp_path):
    dst = tmp_path / "lake"
    shutil.copytree(clt_lake, dst, ignore=shutil.ignore_patterns("saes", "catalog.duckdb*"))
    return str(dst)


def _clt(arch="clt", n=1, L=3, d=8, s=16, **opts):
    torch.manual_seed(0)
    m = dictionaries.get(arch).build(
        L * d, L * s, L * d, n, hooks=[f"i{i}" for i in range(L)], out_hooks=[f"o{i}" for i in range(L)], **opts
    )
    m.initialize([torch.Generator().manual_seed(i) for i in range(n)])
    with torch.no_grad():
        m.b_dec.normal_()
        for i in range(L):
            m.layer("b_enc", i).normal_(0, 0.1)
    return m


def _reference(m, x, mask=None):
    """The definition, dense: f_i = act(x_i W_enc_i + b_enc_i), y_j = b_dec_j + Σ_{i≤j} f_i W_dec_{i→j}."""
    L, d, s = m.L, m.d, m.s
    fs = []
    for i in range(L):
        pre = x[:, i * d : (i + 1) * d] @ m.layer("W_enc", i) + m.layer("b_enc", i).unsqueeze(1)
        if mask is not None:  # TopK: the selection the kind made
            fs.append(torch.relu(pre) * mask[..., i * s : (i + 1) * s])
        else:
            fs.append(pre * (pre > m.theta(i).unsqueeze(1)))
    ys = []
    for j in range(L):
        y = m.b_dec[:, None, j * d : (j + 1) * d]
        for i in range(j + 1):
            y = y + fs[i] @ m.layer("W_dec", i)[..., (j - i) * d : (j - i + 1) * d]
        ys.append(y)
    return torch.cat(ys, -1), torch.cat(fs, -1)


def test_topk_clt_is_the_definition_with_sparse_gradients():
    """Sparse kernels (per-layer top k, embedding_bag decode) equal the dense definition, values and
    gradients; each layer keeps k latents per token."""
    m = _clt(n=2, k=3)
    x = torch.randn(10, 24)
    codes = m.encode(x)
    y = m.decode(codes)
    (y.pow(2).sum() + y.sum()).backward()
    sparse = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    f = codes.dense().detach()
    assert ((f[..., :16] != 0).sum(-1) <= 3).all() and ((f[..., 32:] != 0).sum(-1) <= 3).all()
    assert float(codes.l0()[0]) == pytest.approx(9, abs=0.5)
    y2, _ = _reference(m, x, (f != 0).float())
    (y2.pow(2).sum() + y2.sum()).backward()
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(sparse[n], p.grad, atol=1e-4, rtol=1e-4)
    # the selection: per layer, among the top 3 pre-activations
    with torch.no_grad():
        pre0 = x[:, :8] @ m.layer("W_enc", 0)[0] + m.layer("b_enc", 0)[0]
        top = torch.zeros(10, 16, dtype=torch.bool).scatter_(1, pre0.topk(3).indices, True)
    assert (f[0, :, :16] != 0).sum() > 10 and not ((f[0, :, :16] != 0) & ~top).any()


def test_jumprelu_clt_is_the_definition_and_its_penalty_weighs_decoder_norms():
    m = _clt("clt-jumprelu", n=2, l1=0.5, tanh_scale=2.0)
    with torch.no_grad():
        for i in range(m.L):
            m.layer("log_threshold", i).fill_(-1.0)
    x = torch.randn(10, 24)
    codes = m.encode(x)
    y2, f = _reference(m, x)
    torch.testing.assert_close(m.decode(codes), y2, atol=1e-5, rtol=1e-5)
    norms = torch.cat([m.layer("W_dec", i).norm(dim=-1) for i in range(m.L)], -1)  # all output layers together
    want = torch.tanh(2.0 * f * norms.unsqueeze(1)).sum((-1, -2)) / 10
    torch.testing.assert_close(m.penalty(codes, 10), want)


@pytest.mark.parametrize("arch", ["clt", "clt-jumprelu"])
def test_an_output_layer_reads_no_later_layer(arch):
    """y_j depends on inputs i ≤ j only."""
    m = _clt(arch, k=3) if arch == "clt" else _clt(arch)
    x = torch.randn(6, 24)
    x2 = x.clone()
    x2[:, 16:] = torch.randn(6, 8)  # change layer 2's input
    y, y2 = m(x)[0], m(x2)[0]
    torch.testing.assert_close(y[:, :16], y2[:, :16])
    assert not torch.allclose(y[:, 16:], y2[:, 16:])


def test_fold_takes_raw_activations():
    m = _clt(k=3)
    state = m.member_state(0)
    s_in, s_out = torch.rand(24) + 0.5, torch.rand(24) + 0.5
    folded = dictionaries.get("clt").fold(state, s_in, s_out)
    m2 = dictionaries.get("clt").build(24, 48, 24, hooks=m.hooks, out_hooks=m.out_hooks, k=3)
    m2.load_member(0, folded)
    x = torch.randn(5, 24)
    torch.testing.assert_close(m2(x / s_in)[0], m(x)[0] / s_out, atol=1e-5, rtol=1e-4)


def test_train_from_one_snapshot_fvu_per_layer_resume_and_analysis(lake, tmp_path):
    """`lake train --arch clt` with {a-b} hook ranges, from one snapshot: FVU per output layer in the
    metrics and the held-out numbers, save -> load gives the same outputs, an interrupted run resumed
    is bitwise the uninterrupted one, and `lake analyze` / `lake feature` show decoder norms per layer."""
    args = [
        "--lake",
        lake,
        "--run",
        "r",
        "--arch",
        "clt",
        "--hook",
        IN,
        "--out-hook",
        OUT,
        "--expansion",
        "4",
        "--k",
        "4",
        "--tokens",
        "12800",
        "--batch-size",
        "256",
        "--repeat",
        "--lr",
        "0.01",
        "--holdout",
        "500",
        "--checkpoint-every",
        "10",
        "--quiet",
    ]
    code, out, err = lake_main("train", *args, "--name", "c")
    assert code == 0, err
    store = SAEStore(lake)
    cfg = store.config("c")
    assert cfg["hooks"] == INS and cfg["out_hooks"] == OUTS and cfg["d_sae"] == 2 * 4 * 32
    per_layer = cfg["holdout"]["fvu_per_hook"]
    assert set(per_layer) == set(OUTS) and all(0 < v < 1 for v in per_layer.values()), per_layer
    names = {r["name"] for r in store.metrics("c")}
    assert {f"fvu:{h}" for h in OUTS} <= names and {f"heldout_fvu:{h}" for h in OUTS} <= names
    curve = [r["value"] for r in store.metrics("c") if r["name"] == f"fvu:{OUTS[1]}"]
    assert curve[-1] < curve[0]
    # save -> load: the loaded CLT (raw units) reproduces its held-out FVU per layer, and loads identically
    sae, _ = store.load("c")
    b = next(SnapshotSource(lake, "r").token_batches(1000, INS + OUTS, rows=tuple(cfg["holdout"]["rows"])))
    acts = {h: a.float() for h, a in b.acts.items()}
    _, written = sae.reconstruct(acts)
    for h in OUTS:
        y = acts[h]
        fvu = float((written[h] - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert fvu == pytest.approx(per_layer[h], rel=1e-3)
    sae2, _ = store.load("c")
    assert all(torch.equal(sae2.reconstruct(acts)[1][h], written[h]) for h in OUTS)
    # resume: interrupted at step 20, resumed, equals the uninterrupted run bit for bit
    code, out, err = lake_main("train", *args, "--name", "c2", "--stop-after", "20")
    assert code == 0 and "interrupted" in out, err
    code, out, err = lake_main("train", *args, "--name", "c2", "--resume")
    assert code == 0, err
    w1, w2 = store.weights("c"), store.weights("c2")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_sweep_stacks_clts_and_trains_live(lake, snapshot, tmp_path):
    """Two CLTs (different lr and seed) step together in one sweep; a CLT trains live as well."""
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        f'run = "r"\ntokens = 1024\nbatch_size = 256\nholdout = 0\narch = "clt"\nhook = "{IN}"\n'
        f'out_hook = "{OUT}"\nexpansion = 2\nk = 4\n[[sae]]\nname = "a"\n[[sae]]\nname = "b"\nlr = 0.01\n'
        "seed = 3\n"
    )
    code, out, err = lake_main("train", "--lake", lake, "--config", str(sweep), "--quiet")
    assert code == 0, err
    store = SAEStore(lake)
    assert store.config("a")["training"]["stacked_with"] == ["a", "b"]
    code, out, err = lake_main(
        "train",
        "--lake",
        lake,
        "--live",
        "--model",
        snapshot["model"],
        "--dataset",
        snapshot["corpus"],
        "--context-size",
        "32",
        "--arch",
        "clt-jumprelu",
        "--hook",
        IN,
        "--out-hook",
        OUT,
        "--expansion",
        "2",
        "--tokens",
        "512",
        "--batch-size",
        "128",
        "--name",
        "live",
        "--quiet",
    )
    assert code == 0, err
    cfg = store.config("live")
    assert cfg["source"] == "live" and cfg["arch"] == "clt-jumprelu"
    assert set(cfg["holdout"]["fvu_per_hook"]) == set(OUTS)


def test_bad_clt_shapes_are_one_line(lake):
    base = ["train", "--lake", lake, "--run", "r", "--tokens", "512", "--quiet"]
    code, _, err = lake_main(*base, "--arch", "clt", "--hook", IN, "--out-hook", OUTS[0])
    assert code == 2 and "needs one out hook per input hook" in err, err
    code, _, err = lake_main(*base, "--arch", "clt", "--hook", IN, "--out-hook", OUT, "--d-sae", "63")
    assert code == 2 and "must be a multiple of the number of layers (2)" in err, err
    code, _, err = lake_main(*base, "--arch", "clt", "--hook", "blocks.{3-1}.ln2.hook_out", "--out-hook", OUT)
    assert code == 2 and "one range {a-b} with a <= b" in err, err


def test_eval_replaces_every_layer_and_export_refuses(lake, tmp_path):
    """lake eval splices the CLT into every covered MLP output (the later layers read the spliced
    stream) and reports CE loss recovered and KL; SAELens has no CLT format: one line."""
    code, _, err = lake_main(
        "train",
        "--lake",
        lake,
        "--run",
        "r",
        "--arch",
        "clt",
        "--hook",
        IN,
        "--out-hook",
        OUT,
        "--expansion",
        "4",
        "--k",
        "8",
        "--tokens",
        "12800",
        "--batch-size",
        "256",
        "--repeat",
        "--lr",
        "0.01",
        "--holdout",
        "0",
        "--name",
        "e",
        "--quiet",
    )
    assert code == 0, err
    code, out, err = lake_main("eval", "--lake", lake, "e", "--tokens", "512", "--json")
    assert code == 0, err
    res = __import__("json").loads(out)
    assert res["ce_loss_recovered"] is not None and res["kl"] >= 0 and "note" not in res, res
    code, _, err = lake_main("export", "--lake", lake, "e", "-o", str(tmp_path / "out"))
    assert code == 2 and err.startswith("error: ") and "no format" in err, err
