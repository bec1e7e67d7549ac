"""Analysis of the bigger dictionaries: a CLT's features carry their decoder norm per output layer, a
Lorsa's are encoded over whole contexts (snapshot and live), and live inference encodes both."""

from __future__ import annotations

import shutil

import pytest
import torch

from saelake.analyze.stores import EmbeddedStore
from saelake.lake import Lake, SnapshotSource
from saelake.lake.hooknames import expand_hooks
from saelake.train import SAEStore
from tests.conftest import cli

CLT_IN, CLT_OUT = "blocks.{0-1}.ln2.hook_out", "blocks.{0-1}.hook_mlp_out"
L_IN, L_OUT = "blocks.0.ln1.hook_normalized", "blocks.0.hook_attn_out"


@pytest.fixture(scope="module")
def kinds_lake(tiny_model, tiny_corpus, tmp_path_factory):
    """One ingest for both kinds (2d + 1d), a CLT and a Lorsa trained on it."""
    from saelake.lake import IngestConfig, ingest

    root = str(tmp_path_factory.mktemp("kindslake") / "lake")
    ingest(
        IngestConfig(
            lake=root,
            model=tiny_model,
            dataset=tiny_corpus,
            tokens=2000,
            context_size=32,
            run="r",
            hooks=expand_hooks([CLT_IN, CLT_OUT]) + [L_IN, L_OUT],
            layouts=["1d", "2d"],
        ),
        progress=False,
    )
    common = [
        "--lake",
        root,
        "--run",
        "r",
        "--tokens",
        "2048",
        "--batch-size",
        "256",
        "--holdout",
        "0",
        "--quiet",
        "--repeat",
    ]
    for args in (
        ["--name", "clt", "--arch", "clt", "--hook", CLT_IN, "--out-hook", CLT_OUT, "--expansion", "2", "--k", "4"],
        [
            "--name",
            "lorsa",
            "--arch",
            "lorsa",
            "--hook",
            L_IN,
            "--out-hook",
            L_OUT,
            "--heads",
            "32",
            "--qk-heads",
            "4",
            "--d-qk",
            "8",
            "--k",
            "4",
        ],
    ):
        code, _, err = cli("train", *common, *args)
        assert code == 0, err
    return root


@pytest.fixture
def lake(kinds_lake, tmp_path):
    dst = tmp_path / "lake"
    shutil.copytree(kinds_lake, dst, ignore=shutil.ignore_patterns("analyses", "catalog.duckdb*"))
    return str(dst)


def test_clt_features_have_decoder_norms_per_layer(lake):
    code, out, err = cli("analyze", "--lake", lake, "clt", "--tokens", "640", "--quiet")
    assert code == 0, err
    store = EmbeddedStore(Lake(lake))
    rec = store.record("clt")
    outs = expand_hooks([CLT_OUT])
    assert rec.out_hooks == outs
    sae, _ = SAEStore(lake).load("clt")
    s = sae.d_sae // 2
    early, late = store.feature("clt", 3), store.feature("clt", s + 3)
    assert len(early["decoder_norms"]) == 2 and all(v > 0 for v in early["decoder_norms"])
    assert late["decoder_norms"][0] == 0 and late["decoder_norms"][1] > 0  # layer 1 writes no earlier layer
    torch.testing.assert_close(torch.tensor(late["decoder_norms"][1]), sae.layer("W_dec", 1)[0, 3].norm())
    code, out, err = cli("feature", "--lake", lake, "clt", str(s + 3))
    assert code == 0 and "decoder norm" in out and outs[1] in out, out + err


def test_lorsa_features_are_encoded_over_whole_contexts(lake, tiny_model, tiny_corpus):
    """A Lorsa head's top context in the store holds the activations the Lorsa gives that context (BOS
    left out); live analysis runs too."""
    code, out, err = cli("analyze", "--lake", lake, "lorsa", "--tokens", "640", "--quiet")
    assert code == 0, err
    store = EmbeddedStore(Lake(lake))
    sae, _ = SAEStore(lake).load("lorsa")
    src = SnapshotSource(lake, "r")
    ctxs = next(src.context_batches(20, [L_IN]))
    f = sae.encode_acts({L_IN: ctxs.acts[L_IN].float()}).dense()[0].view(20, 32, -1)
    checked = 0
    for head in range(sae.d_sae):
        feat = store.feature("lorsa", head)
        top = [s for s in feat["samples"] if s["kind"] == "top"]
        if not top:
            continue
        sample = top[0]
        want = f[sample["context_id"], :, head]
        got = torch.zeros(32)
        got[sample["positions"]] = torch.tensor(sample["acts"])
        want[ctxs.tokens[sample["context_id"]] == src.manifest.model_info.bos_token_id] = 0
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
        checked += 1
    assert checked > 5
    code, out, err = cli(
        "analyze",
        "--lake",
        lake,
        "lorsa",
        "--live",
        "--model",
        tiny_model,
        "--dataset",
        tiny_corpus,
        "--context-size",
        "32",
        "--tokens",
        "320",
        "--name",
        "lorsa-live",
        "--quiet",
    )
    assert code == 0, err
    assert store.record("lorsa-live").source == "live"


def test_live_inference_encodes_clts_and_lorsa(lake):
    """The UI's live encoder: one text through the model, the dictionary's latents per token."""
    from saelake.analyze.web.data import LakeData
    from saelake.analyze.web.live import LiveEncoder

    live = LiveEncoder(LakeData(lake))
    for name in ("clt", "lorsa"):
        res = live.run(name, "The cat sat on the mat because it was warm.", top=3)
        assert len(res["top"]) == len(res["tokens"]) > 5 and any(res["top"])
    # Lorsa is causal: a token's heads do not change with the text after it
    a = live.run("lorsa", "The cat sat on the mat", feature=None, top=3)
    b = live.run("lorsa", "The cat sat on the mat and then the dog came", feature=None, top=3)
    n = len(a["tokens"])
    assert b["tokens"][:n] == a["tokens"]
    for ta, tb in zip(a["top"][: n - 1], b["top"][: n - 1]):
        assert [i for i, _ in ta] == [i for i, _ in tb] and [v for _, v in ta] == pytest.approx([v for _, v in tb])


def test_latent_index_of_a_lorsa_encodes_whole_contexts(lake):
    """lake encode: a Lorsa's index rows are its heads at each position of whole contexts."""
    import lance

    code, _, err = cli("encode", "--lake", lake, "lorsa", "--quiet")
    assert code == 0, err
    t = lance.dataset(f"{lake}/indexes/lorsa/latents.lance").to_table().to_pylist()
    sae, _ = SAEStore(lake).load("lorsa")
    ctxs = next(SnapshotSource(lake, "r").context_batches(2, [L_IN]))
    f = sae.encode_acts({L_IN: ctxs.acts[L_IN].float()}).dense()[0].view(2, 32, -1)
    rows = [r for r in t if r["context_id"] == 1]
    assert len(rows) == 31  # BOS left out
    for r in rows[:10]:
        want = f[1, r["position"]]
        assert r["features"] == want.nonzero().squeeze(1).tolist()
        torch.testing.assert_close(torch.tensor(r["acts"]), want[want != 0].half().float(), atol=1e-3, rtol=1e-3)


def test_feature_pages_show_decoder_norms_and_head_attention(lake):
    """The UI's feature page: a CLT feature's decoder norm per output layer; a Lorsa head's attention
    pattern on its top examples (from the peak position, equal to the head's own on that context)."""
    from saelake.analyze.web.server import WebApp

    for name in ("clt", "lorsa"):
        code, _, err = cli("analyze", "--lake", lake, name, "--tokens", "640", "--quiet")
        assert code == 0, err
    app = WebApp(lake, live=False)
    sae, _ = SAEStore(lake).load("clt")
    status, _, body, _ = app.handle("GET", f"/sae/clt/feature/{sae.d_sae // 2 + 1}")
    html = body.decode()
    assert status == 200 and 'id="decoder-norms"' in html and "blocks.1.hook_mlp_out" in html and ">0%<" in html
    lorsa, _ = SAEStore(lake).load("lorsa")
    store = EmbeddedStore(Lake(lake))
    head = next(h for h in range(lorsa.d_sae) if any(s["kind"] == "top" for s in store.feature("lorsa", h)["samples"]))
    status, _, body, _ = app.handle("GET", f"/sae/lorsa/feature/{head}")
    html = body.decode()
    assert status == 200 and 'class="attn"' in html and "attends from" in html and 'id="decoder-norms"' not in html
    from saelake.analyze.web.kinds import attention_rows

    top = [s for s in store.feature("lorsa", head)["samples"] if s["kind"] == "top"]
    rows = attention_rows(Lake(lake), {"arch": "lorsa", "name": "lorsa"}, {"run": "r", "version": None}, head, top)
    cid = top[0]["context_id"]
    peak, pairs = rows[cid]
    ctx = next(SnapshotSource(lake, "r").context_batches(1, [L_IN], start=cid))
    want = lorsa.attention(ctx.acts[L_IN][0].float(), head)[peak]
    assert pairs and all(abs(float(want[p]) - w) < 1e-6 for p, w in pairs)
    assert [p for p, _ in pairs] == want.topk(len(pairs)).indices.tolist()
