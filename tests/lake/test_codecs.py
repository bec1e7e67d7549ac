"""Each storage codec round-trips within its stated error bound, on activations with massive
channels and tokens (as SmolLM2's residual stream has)."""

import math

import pytest
import torch

from saelake.lake.codecs import CODECS, E4M3_MAX, INT8_BLOCK, get_codec


def _acts(n=512, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 5] *= 60  # a massive channel
    x[3] *= 200  # a massive token
    x[7] = 0  # an all-zero vector
    return x


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32"])
def test_plain_codecs_are_the_cast(name):
    x = _acts()
    c = get_codec(name)
    stored = c.encode(x)
    assert stored.shape == (512, c.width(96)) and stored.dtype == c.storage
    assert torch.equal(c.decode(stored, 96).float(), x.to(getattr(torch, name)).float())


def test_int8_is_within_half_a_step_per_block():
    x = _acts()
    c = get_codec("int8")
    stored = c.encode(x)
    nb = math.ceil(96 / INT8_BLOCK)
    assert stored.dtype == torch.int8 and stored.shape == (512, 96 + 2 * nb)
    y = c.decode(stored, 96)
    assert y.dtype == torch.float32 and y.shape == x.shape
    # the step of each block is its absmax / 127 (rounded to float16): error <= half a step
    blocks = torch.nn.functional.pad(x, (0, nb * INT8_BLOCK - 96)).view(512, nb, INT8_BLOCK)
    step = (blocks.abs().amax(-1) / 127).half().float().repeat_interleave(INT8_BLOCK, 1)[:, :96]
    assert ((y - x).abs() <= step / 2 * (1 + 1e-3) + 1e-12).all()
    assert torch.equal(y[7], torch.zeros(96))
    # a massive channel coarsens only its own block: the other block of the same tokens stays fine
    other = slice(INT8_BLOCK, 96)
    assert ((y - x)[:, other].norm() / x[:, other].norm()) < 0.01


def test_float8_is_within_e4m3_rounding_of_a_per_token_scale():
    x = _acts()
    c = get_codec("float8")
    stored = c.encode(x)
    assert stored.dtype == torch.uint8 and stored.shape == (512, 100)
    y = c.decode(stored, 96)
    scale = (x.abs().amax(1, keepdim=True) / E4M3_MAX).clamp_min(1e-30)
    # 3 mantissa bits: relative error <= 2^-4 for normal values; absolute <= 2^-10 * scale below 2^-6
    bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10)
    assert ((y - x).abs() <= bound * (1 + 1e-5)).all()
    assert torch.equal(y[7], torch.zeros(96))


@pytest.mark.parametrize("name", list(CODECS))
def test_codecs_keep_leading_dimensions(name):
    x = _acts(n=24).view(2, 12, 96)  # [contexts, T, d] as in the 2d table
    c = get_codec(name)
    stored = c.encode(x)
    assert stored.shape == (2, 12, c.width(96))
    assert torch.equal(c.decode(stored, 96).float(), c.decode(c.encode(x.view(24, 96)), 96).float().view(2, 12, 96))


def test_unknown_codec_names_the_choices():
    with pytest.raises(ValueError, match="int8"):
        get_codec("int4")
