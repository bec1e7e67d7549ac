"""Several models in one lake: the same tokens through each (one tokenizer), aligned columns per
(model, hook); a crosscoder spans the models (snapshot, sweep, live) and its analysis shows each
feature's decoder norm per model. Two tiny models of different seeds stand in for two checkpoints."""

from __future__ import annotations

import shutil

import pytest
import torch

from saelake.analyze.stores import EmbeddedStore
from saelake.lake import Lake, SnapshotSource
from tests.conftest import cli, make_tiny_model

H = "blocks.1.hook_resid_post"
A, B = f"a:{H}", f"b:{H}"


@pytest.fixture(scope="module")
def two_models(tiny_model, tmp_path_factory):
    other = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2-seed1", seed=1)
    return tiny_model, str(other)


@pytest.fixture(scope="module")
def two_model_lake(two_models, tiny_corpus, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("twolake") / "lake")
    a, b = two_models
    code, out, err = cli(
        "ingest",
        "--lake",
        root,
        "--model",
        f"a={a},b={b}",
        "--dataset",
        tiny_corpus,
        "--hooks",
        H,
        "--tokens",
        "2000",
        "--context-size",
        "32",
        "--run",
        "ab",
        "--quiet",
    )
    assert code == 0, err
    code, out, err = cli(
        "ingest",
        "--lake",
        root,
        "--model",
        a,
        "--dataset",
        tiny_corpus,
        "--hooks",
        H,
        "--tokens",
        "2000",
        "--context-size",
        "32",
        "--run",
        "a-only",
        "--quiet",
    )
    assert code == 0, err
    return root


@pytest.fixture
def lake(two_model_lake, tmp_path):
    dst = tmp_path / "lake"
    shutil.copytree(two_model_lake, dst, ignore=shutil.ignore_patterns("saes", "analyses", "catalog.duckdb*"))
    return str(dst)


def test_same_tokens_aligned_columns_per_model(lake):
    """Run ab holds a:H and b:H; a:H is exactly what a run of model a alone stores, row for row
    (1d and 2d), and b's activations are its own."""
    src, solo = SnapshotSource(lake, "ab"), SnapshotSource(lake, "a-only")
    assert src.hooks == [A, B] and src.d_model == {A: 32, B: 32}
    assert src.manifest.columns[A] == "a__blocks_1_hook_resid_post"
    both, one = next(src.context_batches(64, [A, B])), next(solo.context_batches(64, [H]))
    assert torch.equal(both.tokens, one.tokens) and torch.equal(both.acts[A], one.acts[H])
    assert not torch.allclose(both.acts[A].float(), both.acts[B].float())
    t_both, t_one = next(src.token_batches(500, [A, B])), next(solo.token_batches(500, [H]))
    assert torch.equal(t_both.acts[A], t_one.acts[H]) and torch.equal(t_both.token_id, t_one.token_id)
    code, out, _ = cli("show", "--lake", lake, "ab")
    assert code == 0 and A in out and B in out


def test_models_must_share_a_tokenizer(two_models, tiny_corpus, tmp_path):
    from transformers import AutoTokenizer

    a, _ = two_models
    other = tmp_path / "other"
    shutil.copytree(a, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zzzz-not-in-a"])
    tok.save_pretrained(other)
    lake = str(tmp_path / "lake")
    base = ["ingest", "--lake", lake, "--dataset", tiny_corpus, "--tokens", "200", "--context-size", "32", "--quiet"]
    code, _, err = cli(*base, "--model", f"a={a},b={other}", "--hooks", H)
    assert code == 2 and "models a and b do not share a tokenizer (different vocabularies)" in err, err
    code, _, err = cli(*base, "--model", f"a={a},b={a}", "--hooks", f"c:{H}")
    assert code == 2 and "no model 'c' in this run (its models: a, b)" in err, err
    code, _, err = cli(*base, "--model", f"{a},{a}", "--hooks", H)
    assert code == 2 and "two models are both called" in err, err


def test_a_crosscoder_across_models_and_its_decoder_norm_per_model(lake, two_models, tiny_corpus, tmp_path):
    """--hook a:H,b:H trains one dictionary on both models (a snapshot, a sweep, live); the analysis stores,
    per feature, its decoder norm in each model, and lake feature shows them with their shares."""
    common = ["--tokens", "4096", "--batch-size", "256", "--holdout", "0", "--quiet", "--expansion", "2", "--k", "4"]
    code, out, err = cli(
        "train", "--lake", lake, "--run", "ab", "--hook", f"{A},{B}", "--name", "x", "--repeat", *common
    )
    assert code == 0, err
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        f'run = "ab"\ntokens = 1024\nbatch_size = 256\nholdout = 0\nhook = "{A},{B}"\nk = 4\n'
        '[[sae]]\nname = "s1"\n[[sae]]\nname = "s2"\nseed = 1\n'
    )
    code, out, err = cli("train", "--lake", lake, "--config", str(sweep), "--quiet")
    assert code == 0, err
    a, b = two_models
    code, out, err = cli(
        "train",
        "--lake",
        lake,
        "--live",
        "--model",
        f"a={a},b={b}",
        "--dataset",
        tiny_corpus,
        "--context-size",
        "32",
        "--hook",
        f"{A},{B}",
        "--name",
        "live",
        "--tokens",
        "1024",
        "--batch-size",
        "256",
        "--holdout",
        "256",
        "--quiet",
    )
    assert code == 0, err
    from saelake.train import SAEStore

    store = SAEStore(lake)
    assert store.config("live")["hooks"] == [A, B] and store.config("s1")["training"]["stacked_with"] == ["s1", "s2"]
    code, out, err = cli("analyze", "--lake", lake, "x", "--tokens", "640", "--quiet")
    assert code == 0, err
    rec = EmbeddedStore(Lake(lake)).record("x")
    assert rec.out_hooks == [A, B]
    sae, _ = store.load("x")
    W = sae.W_dec[0]
    for f in (0, 7, 30):
        feat = EmbeddedStore(Lake(lake)).feature("x", f)
        want = [float(W[f, :32].norm()), float(W[f, 32:].norm())]
        assert feat["decoder_norms"] == pytest.approx(want, rel=1e-5)
    code, out, err = cli("feature", "--lake", lake, "x", "7")
    assert code == 0 and f"decoder norm {A}" in out.replace("\n", " ") and B in out, out + err


def test_eval_of_a_crosscoder_across_models_is_reconstruction_only(lake, two_models):
    """One forward pass cannot splice two models: lake eval reports the reconstruction metrics and says so."""
    import json

    code, _, err = cli(
        "train",
        "--lake",
        lake,
        "--run",
        "ab",
        "--hook",
        f"{A},{B}",
        "--name",
        "e",
        "--tokens",
        "1024",
        "--batch-size",
        "256",
        "--holdout",
        "0",
        "--quiet",
    )
    assert code == 0, err
    code, out, err = cli("eval", "--lake", lake, "e", "--tokens", "256", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["fvu"] > 0 and "ce_loss_recovered" not in res and "not spliced" in res["note"], res
    assert "depends on a:" in res["note"] or "depends on b:" in res["note"], res["note"]
