"""Storage codecs for activation columns: how a float vector becomes the bytes of one table cell.

A codec turns ``[..., d]`` float activations into ``[..., width]`` storage elements and back.
Quantised codecs keep their scales *inside the same cell* as the codes (the cell is the codes
followed by the scale bytes), so no reader, query or caller can ever get codes without their
scales: decoding is the only way out of a cell.

    float16, bfloat16, float32   plain casts (width = d); bfloat16 is stored as its raw 16 bits
    int8                         symmetric int8 with one float16 scale per token and block of
                                 ``INT8_BLOCK`` channels: [d int8 codes | n_blocks float16 scales]
    float8                       e4m3 with one float32 scale per token: [d e4m3 codes | 4 scale bytes]

Why blocks for int8: a per-token scale is set by the token's largest channel, and residual
streams have a few massive channels (SmolLM2: tens of times the median) that would make the
step of every other channel of that token coarse. A scale per block of 64 channels confines
that to the outlier's block, for 2 bytes per 64 values (d = 576: 594 bytes vs 1,152 for float16).
e4m3's floating point keeps relative precision over a wide range, so one scale per token suffices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import torch

INT8_BLOCK = 64  # channels per int8 scale (see above)
E4M3_MAX = 448.0  # largest finite float8 e4m3fn value


@dataclass(frozen=True)
class Codec:
    """One storage format: ``storage`` is the torch dtype of the stored elements, ``arrow`` their Arrow type."""

    name: str
    storage: torch.dtype
    arrow: pa.DataType

    def width(self, d: int) -> int:
        """Storage elements per vector of ``d`` channels."""
        if self.name == "int8":
            return d + 2 * math.ceil(d / INT8_BLOCK)
        if self.name == "float8":
            return d + 4
        return d

    @property
    def quantised(self) -> bool:
        return self.name in ("int8", "float8")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` float -> ``[..., width]`` storage elements (contiguous)."""
        if self.name == "int8":
            return _int8_encode(x)
        if self.name == "float8":
            return _float8_encode(x)
        return x.detach().to(self.storage).contiguous()

    def decode(self, t: torch.Tensor, d: int) -> torch.Tensor:
        """``[..., width]`` storage elements -> ``[..., d]`` activations: float32 for quantised codecs;
        the storage dtype itself (a zero-copy view) for the plain ones."""
        if self.name == "int8":
            return _int8_decode(t, d)
        if self.name == "float8":
            return _float8_decode(t, d)
        return t.view(self.storage) if t.dtype != self.storage else t  # bfloat16 arrives as its uint16 bits


CODECS = {
    "float16": Codec("float16", torch.float16, pa.float16()),
    "bfloat16": Codec("bfloat16", torch.bfloat16, pa.uint16()),  # Arrow has no bfloat16: its raw bits
    "float32": Codec("float32", torch.float32, pa.float32()),
    "int8": Codec("int8", torch.int8, pa.int8()),
    "float8": Codec("float8", torch.uint8, pa.uint8()),  # e4m3fn bits + the scale's bytes
}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(CODECS)}") from None


def _int8_encode(x: torch.Tensor) -> torch.Tensor:
    *lead, d = x.shape
    nb = math.ceil(d / INT8_BLOCK)
    x = x.detach().float().reshape(-1, d)
    padded = torch.nn.functional.pad(x, (0, nb * INT8_BLOCK - d)).view(-1, nb, INT8_BLOCK)
    # the scale is rounded to float16 first and the codes computed with the rounded value, so
    # decode(encode(x)) is within half a step of x for every channel
    scale = (padded.abs().amax(-1) / 127).clamp_(max=65504).to(torch.float16)
    inv = torch.where(scale > 0, 1 / scale.float(), torch.zeros_like(scale, dtype=torch.float32))
    codes = (padded * inv.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8).view(-1, nb * INT8_BLOCK)[:, :d]
    out = torch.cat([codes, scale.view(torch.int8).view(-1, 2 * nb)], dim=1)
    return out.view(*lead, d + 2 * nb)


def _int8_decode(t: torch.Tensor, d: int) -> torch.Tensor:
    *lead, w = t.shape
    nb = (w - d) // 2
    t = t.reshape(-1, w)
    scale = t[:, d:].contiguous().view(torch.float16).float()  # [n, nb]
    codes = t[:, :d].float()
    if d % INT8_BLOCK == 0:
        out = (codes.view(-1, nb, INT8_BLOCK) * scale.unsqueeze(-1)).view(-1, d)
    else:
        out = codes * scale.repeat_interleave(INT8_BLOCK, dim=1)[:, :d]
    return out.view(*lead, d)


def _float8_encode(x: torch.Tensor) -> torch.Tensor:
    *lead, d = x.shape
    x = x.detach().float().reshape(-1, d)
    scale = x.abs().amax(-1, keepdim=True) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    out = torch.cat([codes, scale.contiguous().view(torch.uint8)], dim=1)
    return out.view(*lead, d + 4)


def _float8_decode(t: torch.Tensor, d: int) -> torch.Tensor:
    *lead, w = t.shape
    t = t.reshape(-1, w)
    scale = t[:, d:].contiguous().view(torch.float32)  # [n, 1]
    out = t[:, :d].contiguous().view(torch.float8_e4m3fn).float() * scale
    return out.view(*lead, d)
