"""Interventions on the real tiny model with SAEs trained here: splicing with the error term kept
leaves the logits alone, clamp/ablate/add do what they say on re-encoding and on the logits,
generation is deterministic, a dictionary that reads a later layer than it writes is refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from saelake.analyze import Edit, Splice, generate
from saelake.analyze.interventions import promoted_tokens
from saelake.lake import UserError, load_model
from saelake.train import SAEConfig, load_sae, train
from tests.analyze.conftest import H0, H1, make_sae


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_lake, tiny_model):
    """SAE ``sae`` (topk at H0), transcoder ``tc`` (H0 -> H1, the next layer's MLP output), and an
    untrained crosscoder ``cc`` reading H0 and H1; with the loaded tiny model."""
    lake = str(tmp_path_factory.mktemp("steer") / "lake")
    shutil.copytree(tiny_lake, lake, ignore=shutil.ignore_patterns("catalog.duckdb*"))
    torch.set_num_threads(1)
    train(
        lake,
        [
            SAEConfig(hooks=[H0], name="sae", arch="topk", expansion=4, k=8, lr=3e-3, init_encoder_norm=1.0),
            SAEConfig(hooks=[H0], out_hooks=[H1], name="tc", arch="topk", expansion=4, k=8, lr=1e-2),
        ],
        run="r1",
        tokens=8000,
        batch_size=256,
        repeat=True,
        progress=False,
    )
    make_sae(lake, "cc", "topk", H0, d_in=64, model=tiny_model)
    from saelake.train.store import SAEStore

    cfg = SAEStore(lake).config("cc") | {
        "hooks": [H0, H1],
        "out_hooks": [H0, H1],
        "hook": f"{H0},{H1}",
        "out_hook": f"{H0},{H1}",
        "d_out": 64,
    }
    SAEStore(lake).save(cfg, SAEStore(lake).weights("cc"))
    return {"lake": lake, "model": load_model(tiny_model)}


def prompt(lm) -> torch.Tensor:
    ids = lm.tokenizer("The old man and the sea were", add_special_tokens=False)["input_ids"]
    return torch.tensor([[lm.bos_token_id] + ids])


@pytest.mark.parametrize("name", ["sae", "tc"])
def test_error_kept_and_no_edit_gives_the_plain_logits(trained, name):
    lm, (sae, _) = trained["model"], load_sae(trained["lake"], name)
    toks = prompt(lm)
    plain = lm.bridge(toks, return_type="logits").float()
    torch.testing.assert_close(Splice(lm, sae).logits(toks), plain, atol=1e-5, rtol=1e-5)
    dropped = Splice(lm, sae, keep_error=False).logits(toks)
    assert (dropped - plain).abs().max() > 1e-3  # the reconstruction is spliced in: it is not the model
    assert torch.equal(dropped[:, 0], plain[:, 0])  # BOS untouched


def test_clamp_sets_the_feature_and_ablate_zeroes_it(trained):
    lm, (sae, _) = trained["model"], load_sae(trained["lake"], "sae")
    toks = prompt(lm)
    x = lm.activations(toks, [H0])[H0][0]
    f = sae.encode(x).dense()[0]
    F, v, at = 3, 6.0, (2, 4)
    spliced = Splice(lm, sae, [Edit(F, "clamp", v, at)]).activations(toks, [H0])[H0][0]
    # error kept: exactly the original plus (v - f_F) x the feature's decoder row, at the edited positions only
    expect = x.clone()
    for p in at:
        expect[p] += (v - f[p, F]) * sae.W_dec[0, F]
    torch.testing.assert_close(spliced, expect, atol=1e-5, rtol=1e-5)
    g = sae.encode(spliced).dense()[0]
    for p in at:
        # the tiny SAE (tied unit init, briefly trained) inverts its decoder to ~25%
        assert g[p, F] == pytest.approx(v, rel=0.3)
    assert torch.equal(spliced[[0, 1, 3]], x[[0, 1, 3]])
    # ablate the feature where it fires: re-encoded, it is (near) zero there
    p, F = max(((p, int(f[p].argmax())) for p in range(1, len(f))), key=lambda t: f[t[0], t[1]])
    ablated = Splice(lm, sae, [Edit(F, "ablate", 0.0, (p,))]).activations(toks, [H0])[H0][0]
    assert float(sae.encode(ablated).dense()[0][p, F]) < 0.35 * float(f[p, F])


def test_add_raises_the_promoted_tokens(trained):
    lm, (sae, _) = trained["model"], load_sae(trained["lake"], "sae")
    toks = prompt(lm)
    F = 7
    ids, effects = promoted_tokens(lm, sae, F, 10)
    assert effects == sorted(effects, reverse=True)
    base = lm.bridge(toks, return_type="logits").float()[0, -1].log_softmax(-1)[ids].mean()
    for v, sign in ((4.0, 1), (-4.0, -1)):
        lp = Splice(lm, sae, [Edit(F, "add", v)]).logits(toks)[0, -1].log_softmax(-1)[ids].mean()
        assert sign * (lp - base) > 0.01


def test_greedy_generation_is_deterministic_and_steers(trained):
    lm, (sae, _) = trained["model"], load_sae(trained["lake"], "sae")
    ids = prompt(lm)[0].tolist()
    plain = generate(lm, ids, 8)
    assert plain == generate(lm, ids, 8)  # greedy: the same every time
    assert generate(lm, ids, 8, Splice(lm, sae)) == plain  # spliced, no edit, error kept: the plain model
    steered = Splice(lm, sae, [Edit(7, "add", 8.0)])
    out = generate(lm, ids, 8, steered)
    assert out == generate(lm, ids, 8, steered) and out != plain
    a, b = (generate(lm, ids, 8, temperature=1.0, seed=s) for s in (1, 1))
    assert a == b  # sampled: the seed decides


def test_bad_interventions_are_one_line_errors(trained):
    lm = trained["model"]
    sae, _ = load_sae(trained["lake"], "sae")
    for edit, msg in (
        (Edit(10_000, "add", 1.0), "no feature 10000"),
        (Edit(1, "add", float("nan")), "finite"),
        (Edit(1, "scale", 1.0), "unknown edit mode"),
    ):
        with pytest.raises(UserError, match=msg):
            Splice(lm, sae, [edit])
    cc, _ = load_sae(trained["lake"], "cc")
    with pytest.raises(UserError, match="depends on blocks.1.hook_mlp_out, which the model computes later"):
        Splice(lm, cc).logits(prompt(lm))
    with pytest.raises(UserError, match="context"):
        generate(lm, [lm.bos_token_id] * 60, 10)


def test_eval_splices_through_the_same_api(trained):
    from saelake.train.evaluate import evaluate

    res = evaluate(trained["lake"], "tc", tokens=256, save=False)
    assert res["ce_loss_recovered"] is not None and res["kl"] > 0  # a transcoder into the next layer: spliced
    res = evaluate(trained["lake"], "cc", tokens=256, save=False)
    assert "ce_sae" not in res and "computes later" in res["note"]  # a crosscoder across layers: not spliceable


def _kind(name: str, d_in: int, d_sae: int, hooks: list[str], out_hooks: list[str], **options):
    from saelake.train import dictionaries

    sae = dictionaries.get(name).build(
        d_in, d_sae, sum(32 for _ in out_hooks), hooks=hooks, out_hooks=out_hooks, **options
    )
    sae.initialize([torch.Generator().manual_seed(0)])
    return sae.inference()


@pytest.mark.parametrize(
    "name,hooks,out_hooks,options",
    [
        (
            "clt",
            ["blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in"],
            ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"],
            {"k": 4},
        ),
        ("lorsa", ["blocks.1.ln1.hook_out"], ["blocks.1.hook_attn_out"], {"k": 4, "d_qk": 8, "rotary_base": 0}),
        ("topk", [H0], [H0], {"k": 4}),
    ],
)
def test_other_kinds_splice_through_their_own_read_and_written(trained, name, hooks, out_hooks, options):
    """A cross-layer transcoder (one encoder per layer, decoders into every later layer) and Lorsa
    (attention over whole contexts) splice like an SAE: with the error term kept and no edit the logits
    are the model's, and an edit at position p leaves every earlier position's logits alone."""
    lm = trained["model"]
    sae = _kind(name, 32 * len(hooks), 16 * len(hooks), hooks, out_hooks, **options)
    toks = prompt(lm)
    plain = lm.bridge(toks, return_type="logits").float()
    torch.testing.assert_close(Splice(lm, sae).logits(toks), plain, atol=1e-5, rtol=1e-5)
    p = 4
    steered = Splice(lm, sae, [Edit(1, "add", 20.0, (p,))]).logits(toks)
    torch.testing.assert_close(steered[:, :p], plain[:, :p], atol=1e-5, rtol=1e-5)
    assert (steered[:, p:] - plain[:, p:]).abs().max() > 1e-3
    assert (Splice(lm, sae, keep_error=False).logits(toks) - plain).abs().max() > 1e-3
