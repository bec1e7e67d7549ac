"""Lorsa (low-rank sparse attention, arXiv 2504.20938): many sparse attention heads, each with a
rank-1 OV circuit, that reconstruct an attention layer's output from its input over whole contexts.

For a context X [T, d] (the layer's attention input, e.g. ``blocks.L.ln1.hook_normalized``):

    A_g   = softmax(rope(X W_Q,g + b_Q,g) rope(X W_K,g + b_K,g)ᵀ / sqrt(d_qk) + causal mask)   g < G groups
    z_h   = A_g(h) (X w_V,h + b_V,h)                        [T]: head h's activation at every position
    f     = relu(top-k over the H heads of z, per position)
    Y     = f W_O + b_O                                      W_O [H, d]: head h writes one direction

H OV heads (``heads``, the dictionary's latents, d_sae) share G QK groups (``qk_heads``): head h uses
group h // (H / G) (scaled dot-product attention with grouped values). ``rope`` is the model's rotary
embedding where it has one (``rotary_base``/``rotary_dim`` read from its config: HF/NeoX style, the
first ``rotary_dim`` dims rotated in halves); GPT-2-style models have none (their positions are in X).
Causal: the output at t reads positions ≤ t only. The decoder is sparse (the selected heads' W_O rows,
``train/kernels.py``); attention is dense.

Lorsa reads whole contexts (``context_input``): the trainer feeds it the 2d table (or live contexts),
and ``encode`` takes [b, T, d] or one context [T, d]; its codes have one row per position, in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from saelake.lake import UserError

from ..kernels import Codes, Pattern, _SparseDecode, dense_threads
from . import register
from .base import Dictionary, Options, option


@dataclass
class LorsaOptions(Options):
    heads: int | None = option(None, "Sparse attention heads (rank-1 OV each): the latents", "d_sae")
    qk_heads: int | None = option(None, "QK groups shared by the heads (divides heads)", "gcd(heads, 16)")
    d_qk: int | None = option(None, "Dimensions of each QK group's queries and keys", "the model's head size")
    k: int | None = option(None, "Active heads per position", "32, at most heads/2")
    rotary_base: float | None = option(None, "RoPE base of queries and keys (0: none)", "the model's")
    rotary_dim: int | None = option(None, "Query/key dimensions RoPE rotates", "the model's share of d_qk")

    def latents(self):
        return self.heads

    def resolve(self, d_in, d_sae, where):
        if self.heads is None:
            self.heads = d_sae
        if self.heads != d_sae:
            raise UserError(f"{where}: heads ({self.heads}) are the latents: give --heads or --d-sae, not both")
        self.qk_heads = math.gcd(self.heads, 16) if self.qk_heads is None else self.qk_heads
        if self.qk_heads <= 0 or self.heads % self.qk_heads:
            raise UserError(f"{where}: qk_heads ({self.qk_heads}) must divide heads ({self.heads})")
        self.k = min(32, self.heads // 2) if self.k is None else self.k
        if not 0 < self.k < self.heads:
            raise UserError(f"{where}: k must be in 1..heads-1 ({self.heads - 1}), got {self.k}")


def model_rotary(model: str) -> tuple[float, float, int]:
    """(RoPE base or 0, rotated share of a head, head size) from a model's Hugging Face config."""
    from transformers import AutoConfig

    from saelake.lake.models import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model(model)[0])
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    base = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if base is None:
        return 0.0, 0.0, head
    if rope.get("rope_type", "default") != "default":
        raise UserError(
            f"model {model} uses RoPE type {rope['rope_type']!r}, which Lorsa does not implement: pass "
            "--rotary-base B (plain RoPE) or --rotary-base 0 (none)"
        )
    return float(base), float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0), head


def rotary(x: torch.Tensor, base: float, dim: int) -> torch.Tensor:
    """RoPE on the first ``dim`` dims of x [..., T, d_qk] (positions 0..T-1), halves rotated (HF/NeoX)."""
    if not base or not dim:
        return x
    T = x.shape[-2]
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    ang = torch.arange(T, dtype=torch.float32, device=x.device)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    r, rest = x[..., :dim], x[..., dim:]
    half = torch.cat([-r[..., dim // 2 :], r[..., : dim // 2]], -1)
    return torch.cat([r * cos + half * sin, rest], -1)


@register
class Lorsa(Dictionary):
    name = "lorsa"
    Options = LorsaOptions
    context_input = True
    attends = True

    def __init__(
        self, d_in, d_sae, d_out, options, *, hooks=None, out_hooks=None, device="cpu", apply_b_dec_to_input=None
    ):
        super().__init__(d_in, d_sae, d_out, options, hooks=hooks, out_hooks=out_hooks, device=device)
        if len(self.hooks) > 1 or len(self.out_hooks) > 1 or d_in != d_out:
            raise UserError(
                f"{self.name}: reads one hook and writes one of the same width (--hook "
                "blocks.L.ln1.hook_normalized --out-hook blocks.L.hook_attn_out)"
            )
        self.apply_b_dec_to_input = None  # (the SAE family's switch)
        o = self.options[0]
        if o.d_qk is None or o.rotary_base is None or o.rotary_dim is None:
            raise UserError(f"{self.name}: d_qk, rotary_base and rotary_dim must be resolved (from the model)")
        n, d, H, G, dq = self.n, d_in, d_sae, o.qk_heads, o.d_qk
        self.G, self.dq, self.k, self.base, self.rot = G, dq, o.k, o.rotary_base, o.rotary_dim
        kw = dict(device=device, dtype=torch.float32)
        self.W_Q, self.W_K = (nn.Parameter(torch.zeros(n, G, d, dq, **kw)) for _ in range(2))
        self.b_Q, self.b_K = (nn.Parameter(torch.zeros(n, G, dq, **kw)) for _ in range(2))
        self.W_V = nn.Parameter(torch.zeros(n, H, d, **kw))
        self.b_V = nn.Parameter(torch.zeros(n, H, **kw))
        self.W_O = nn.Parameter(torch.zeros(n, H, d, **kw))
        self.b_O = nn.Parameter(torch.zeros(n, d, **kw))

    @classmethod
    def resolve_shape(cls, options, hooks, out_hooks, widths, d_sae, where, model=None):
        if len(hooks) != 1 or len(out_hooks) != 1 or widths[hooks[0]] != widths[out_hooks[0]]:
            raise UserError(
                f"{where}: Lorsa reads one hook and writes one of the same width (--hook "
                "blocks.L.ln1.hook_normalized --out-hook blocks.L.hook_attn_out)"
            )
        base, share, head = (
            model_rotary(model)
            if model and None in (options.rotary_base, options.d_qk, options.rotary_dim)
            else (0.0, 1.0, None)
        )
        options.d_qk = options.d_qk or head or max(1, widths[hooks[0]] // 8)
        options.rotary_base = base if options.rotary_base is None else options.rotary_base
        if options.rotary_dim is None:
            options.rotary_dim = 2 * int(options.d_qk * share // 2) if options.rotary_base else 0
        if (
            options.d_qk <= 0
            or options.rotary_base < 0
            or options.rotary_dim % 2
            or not 0 <= options.rotary_dim <= options.d_qk
        ):
            raise UserError(f"{where}: d_qk must be positive, rotary_base >= 0 and rotary_dim even, in 0..d_qk")

    @classmethod
    def dims(cls, w):
        return w["W_V"].shape[1], w["W_V"].shape[0], w["W_O"].shape[1]

    # -- init --------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, generators, dec_norm: float | None = None) -> None:
        """Q, K ~ N(0, 1/d); value and output rows random unit vectors (z starts about N(0, 1) on normalised
        inputs); biases 0."""
        d = self.d_in
        for m, gen in enumerate(generators):
            for W in (self.W_Q, self.W_K):
                W[m] = torch.randn(W.shape[1:], generator=gen) / math.sqrt(d)
            for W in (self.W_V, self.W_O):
                w = torch.randn(W.shape[1:], generator=gen)
                W[m] = w / w.norm(dim=-1, keepdim=True) * (dec_norm or 1.0)

    @torch.no_grad()
    def init_from_data(self, y, how):
        if how != "zeros":
            self.b_O.copy_((y.mean(0) if how == "mean" else y.median(0).values).expand(self.n, -1))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_O /= self.W_O.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    # -- shape -------------------------------------------------------------------------------------
    def target(self, acts):
        y = acts[self.out_hooks[0]]
        return y.reshape(-1, y.shape[-1])  # one row per position, as the codes

    def encode_acts(self, acts):
        return self.encode(self.read(acts))

    # -- encode / decode ---------------------------------------------------------------------------
    def heads_pre(self, x: torch.Tensor, pattern: bool = False):
        """z [n, b·T, H] for contexts x [b, T, d] (and the attention patterns [b, n·G, T, T] if asked)."""
        n, G, H = self.n, self.G, self.d_sae
        b, T, _ = x.shape
        with dense_threads():
            q = torch.einsum("btd,ngde->bngte", x, self.W_Q) + self.b_Q[None, :, :, None]
            k = torch.einsum("btd,ngde->bngte", x, self.W_K) + self.b_K[None, :, :, None]
            v = torch.einsum("btd,nhd->bnht", x, self.W_V) + self.b_V[None, :, :, None]
        q = rotary(q.reshape(b, n * G, T, self.dq), self.base, self.rot)
        k = rotary(k.reshape(b, n * G, T, self.dq), self.base, self.rot)
        v = v.reshape(b, n * G, H // G, T).transpose(-1, -2)  # [b, n·G, T, heads per group]
        if pattern:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.dq)
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), -math.inf)
            att = scores.softmax(-1)
            z = att @ v
        else:
            att = None
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(self.dq))
        z = z.reshape(b, n, G, T, H // G).permute(1, 0, 3, 2, 4).reshape(n, b * T, H)
        return (z, att) if pattern else z

    def encode(self, x, k=None, *, training=False, comm=None):
        """Codes of every position of contexts ``x`` [b, T, d] (or one context [T, d]): the top k heads per
        position (ReLU of their activation), rows context-major."""
        if x.ndim == 2:
            x = x.unsqueeze(0)
        z = self.heads_pre(x)
        n, B, H = z.shape
        kk = self.k if k is None else int(k[0] if isinstance(k, list) else k)
        with torch.no_grad(), dense_threads():
            top = z.detach().topk(kk, dim=-1, sorted=False)
        vals = F.relu(z.gather(-1, top.indices)).reshape(-1)
        pat = Pattern(
            n,
            B,
            H,
            torch.arange(n * B, device=x.device).repeat_interleave(kk),
            top.indices.reshape(-1),
            torch.arange(0, n * B * kk + 1, kk, device=x.device),
        )
        return Codes(n, B, H, bag=pat.bag, lat=pat.lat, vals=vals, pat=pat)

    def decode(self, codes, bias=True):
        if codes.acts is not None:
            return torch.baddbmm(self.b_O.unsqueeze(1), codes.acts, self.W_O)
        return _SparseDecode.apply(codes.vals, self.W_O, self.b_O if bias else None, codes.pat)

    def forward(self, x):
        return self.decode(self.encode(x))

    @torch.no_grad()
    def attention(self, x: torch.Tensor, head: int, m: int = 0) -> torch.Tensor:
        """[T, T]: the attention pattern (query x key) head ``head`` uses on one context x [T, d]."""
        _, att = self.heads_pre(x.unsqueeze(0), pattern=True)
        return att[0, m * self.G + head // (self.d_sae // self.G)]

    def decoder_directions(self, m: int = 0) -> torch.Tensor:
        return self.W_O[m].detach()

    # -- files -------------------------------------------------------------------------------------
    NAMES = ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")

    def member_state(self, m):
        return {k: getattr(self, k)[m].detach().clone().contiguous() for k in self.NAMES}

    @torch.no_grad()
    def load_member(self, m, state):
        for k in self.NAMES:
            getattr(self, k)[m] = state[k]

    @classmethod
    def fold(cls, state, s_in, s_out):
        """Heads stay as trained: Q, K and V read raw x (W' = diag(s_in)·W), W_O' = W_O/s_out, b_O' = b_O/s_out."""
        out = dict(state)
        for k in ("W_Q", "W_K"):
            out[k] = state[k] * s_in.view(1, -1, 1)
        out["W_V"] = state["W_V"] * s_in
        out["W_O"] = state["W_O"] / s_out
        out["b_O"] = state["b_O"] / s_out
        return out
