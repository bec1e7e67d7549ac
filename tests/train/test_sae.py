"""The SAE kinds: sparse paths equal dense math, stacking equals separate SAEs, folding is exact."""

from __future__ import annotations

import pytest
import torch

from saelake.train import dictionaries
from saelake.train.store import fold_normalization, sae_from_weights


def _model(arch, n=1, d_in=16, d_sae=48, d_out=None, k=4, seed=0):
    torch.manual_seed(seed)
    kind = dictionaries.get(arch)
    m = kind.build(d_in, d_sae, d_out, n, k=k if arch in ("topk", "batchtopk") else None)
    m.initialize([torch.Generator().manual_seed(seed + i) for i in range(n)])
    with torch.no_grad():
        m.b_dec.normal_()
        m.b_enc.normal_(0, 0.1)
        if arch == "jumprelu":
            m.log_threshold.fill_(-1.0)
        if arch == "batchtopk":
            m.threshold.fill_(0.5)
    return m


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("d_out", [None, 12])
def test_sparse_path_matches_dense_autograd(arch, d_out):
    m = _model(arch, n=3, d_out=d_out, k=[4, 6, 5] if arch == "topk" else [4, 4, 4])
    x = torch.randn(10, 16)
    y = m(x)
    (y.pow(2).sum() + y.sum()).backward()
    sparse_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    mask = (m.encode(x).dense() != 0).float()  # same selection, dense math
    acts = torch.relu(m.pre(x)) * mask
    y2 = torch.baddbmm(m.b_dec.unsqueeze(1), acts, m.W_dec)
    (y2.pow(2).sum() + y2.sum()).backward()
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(sparse_grads[n], p.grad, atol=1e-4, rtol=1e-4)


def test_topk_selects_k_per_token_and_member():
    m = _model("topk", n=2, k=[3, 5])
    codes = m.encode(torch.randn(7, 16))
    nz = codes.dense() != 0
    assert nz.sum(-1)[0].max() <= 3 and nz.sum(-1)[1].max() <= 5
    assert codes.l0()[1] > codes.l0()[0]


def test_batchtopk_keeps_k_per_token_on_average():
    m = _model("batchtopk", k=4)
    codes = m.encode(torch.randn(32, 16), training=True)
    assert float(codes.l0()[0]) == pytest.approx(4, abs=0.01)
    assert (codes.dense() != 0).sum(-1).max() > 4  # per batch, not per token


def test_stacked_members_equal_separate_models():
    stacked = _model("topk", n=2, k=[4, 6])
    x = torch.randn(9, 16)
    y = stacked(x)
    for i, k in enumerate([4, 6]):
        single = dictionaries.get("topk").build(16, 48, k=k)
        single.load_member(0, stacked.member_state(i))
        torch.testing.assert_close(single(x)[0], y[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("transcoder", [False, True])
def test_folding_normalization_is_exact(arch, transcoder):
    """SAE on normalised inputs == folded SAE on raw inputs (JumpReLU/BatchTopK thresholds too)."""
    d_out = 12 if transcoder else None
    m = _model(arch, d_out=d_out).inference()
    s_in = torch.full((16,), 3.7)
    s_out = torch.full((d_out or 16,), 0.42 if transcoder else 3.7)
    x = torch.randn(20, 16) * 5
    y_norm = m(x * s_in)[0] / s_out  # trained SAE, back to raw units
    folded = fold_normalization(m.member_state(0), s_in, s_out, arch)
    cfg = {"arch": arch, "k": 4, "apply_b_dec_to_input": m.apply_b_dec_to_input}
    y_raw = sae_from_weights(cfg, folded)(x)[0]
    torch.testing.assert_close(y_raw, y_norm, atol=1e-4, rtol=1e-4)


def test_jumprelu_threshold_gets_gradient():
    m = _model("jumprelu")
    m.bandwidth = 10.0  # wide kernel: every pre-activation is near the threshold
    codes = m.encode(torch.randn(8, 16))
    m.decode(codes).pow(2).sum().backward()
    assert m.log_threshold.grad.abs().sum() > 0


def test_members_pay_only_for_their_own_k():
    """Stacked TopK members with different k: each member's entries are its own k per token (no
    member computes or carries the largest k), and the selection equals each member's own top-k."""
    m = _model("topk", n=3, k=[2, 8, 5])
    x = torch.randn(11, 16)
    codes = m.encode(x)
    assert len(codes.lat) == 11 * (2 + 8 + 5)
    pre = m.pre(x)
    for i, k in enumerate([2, 8, 5]):
        rows = (codes.bag >= i * 11) & (codes.bag < (i + 1) * 11)
        got = codes.lat[rows].view(11, k).sort(-1).values
        want = pre[i].topk(k, dim=-1).indices.sort(-1).values
        assert torch.equal(got, want)


def test_auxk_uses_only_dead_latents():
    m = _model("topk", n=2, k=4)
    x = torch.randn(6, 16)
    pre = m.pre(x).detach()
    dead = torch.zeros(2, 48, dtype=torch.bool)
    dead[0, :10] = True  # member 1 has no dead latent: no AuxK entries
    ac = m.aux_codes(x, pre, dead, aux_k=3)
    assert len(ac.lat) == 6 * 3 and bool((ac.lat < 10).all()) and bool((ac.bag < 6).all())


def test_crosscoder_reads_and_writes_its_hooks():
    """A kind's shape: a crosscoder reads its hooks concatenated, and its output splits back per hook."""
    m = dictionaries.get("topk").build(24, 48, k=4, hooks=["a", "b"])
    acts = {"a": torch.randn(5, 16), "b": torch.randn(5, 8), "c": torch.randn(5, 3)}
    x = m.read(acts)
    assert torch.equal(x, torch.cat([acts["a"], acts["b"]], -1)) and torch.equal(m.target(acts), x)
    parts = m.written(m(x)[0], {"a": 16, "b": 8})
    assert list(parts) == ["a", "b"] and parts["a"].shape == (5, 16) and parts["b"].shape == (5, 8)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_initial_encoder_is_the_decoder_transposed_at_the_kinds_norm(arch):
    """TopK kinds start their encoder rows at init_encoder_norm (default 1/sqrt(3), nn.Linear's and
    sparsify's scale) along the decoder rows; other kinds at the decoder's norm."""
    m = dictionaries.get(arch).build(16, 48, n=2, init_encoder_norm=[0.5, None] if arch == "topk" else None)
    m.initialize([torch.Generator().manual_seed(i) for i in range(2)])
    dec = m.W_dec.detach()
    enc = m.W_enc.detach().transpose(1, 2)
    want = [0.5, 3**-0.5] if arch == "topk" else [0.1, 0.1]  # relu's decoder rows start at 0.1
    for i in range(2):
        torch.testing.assert_close(enc[i].norm(dim=-1), torch.full((48,), want[i]))
        torch.testing.assert_close(enc[i] / want[i], dec[i] / dec[i].norm(dim=-1, keepdim=True))


def test_batchtopk_selects_from_candidates_what_a_full_topk_selects():
    """BatchTopK takes the batch's top k·B from each token's 4k largest scores; that must be exactly the
    full top-k's selection, also when one token holds more of the top than its candidates (fallback)."""
    m = _model("batchtopk", d_sae=64, k=4)
    x = torch.randn(50, 16)
    crowded = m.pre(x)
    crowded[0, 0] += 100.0  # token 0's 64 latents are all in the top 200: more than its 16 candidates
    for pre in (m.pre(x), crowded):
        got = m._select(pre, pre, [4])
        m.CANDIDATES = 10**6  # no candidates: the full top-k over all B·S scores
        want = m._select(pre, pre, [4])
        del m.CANDIDATES
        assert torch.equal(got[0].bag, want[0].bag) and torch.equal(got[0].lat, want[0].lat)
        assert torch.equal(got[1], want[1])
    assert m._batch_top(crowded[0], 200) is None and m._batch_top(m.pre(x)[0], 200) is not None
