"""Sparse autoencoders, transcoders and crosscoders: the family's parameters (``SAE``) and the
``relu`` and ``jumprelu`` kinds (``topk`` and ``batchtopk`` are in ``topk.py``).

A member maps ``x [B, d_in]`` (one hook, or several hooks concatenated for a crosscoder) to latents
``f [B, d_sae]`` and back to ``y_hat [B, d_out]`` (the same hooks for an SAE, other hooks for a
transcoder):

    pre   = (x - b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc       W_enc [n, d_in, d_sae] (stored transposed)
    f     = relu(pre) | topk(relu(pre), k) | batch-topk | pre·H(pre - θ)  (JumpReLU)
    y_hat = f @ W_dec + b_dec                                          W_dec [n, d_sae, d_out]

TopK and BatchTopK never build the dense ``f``: the encoder's backward, the decoder and its
backward run on the selected (token, latent) pairs only (embedding_bag, sampled matmul,
sparse×dense products), so only the encoder's forward matmul is dense. The pairs are sorted
latent-major once per step (``Pattern``), and that order serves both weight gradients (CSR
sparse × dense). Stacked TopK members with different k each take their own top-k: no member
pays for another's k. AuxK reuses the step's pre-activations (no second encoder pass).
The kernels live in ``train/kernels.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from saelake.lake import UserError

from ..kernels import Codes, _JumpReLU, _SparseDecode, _Step, dense_threads
from . import register
from .base import Dictionary, Options, SAELensFormat, fraction, option


class SAE(Dictionary):
    """The family's parameters and shared math: encoder, decoder, their init, normalization folding.

    Every member also has an inference ``threshold`` (BatchTopK estimates it; the other kinds keep
    0), so that every checkpoint of this family holds the same tensors."""

    init_decoder_norm = 1.0  # decoder rows start with this norm

    def __init__(
        self,
        d_in,
        d_sae,
        d_out,
        options,
        *,
        apply_b_dec_to_input: bool | None = None,
        hooks=None,
        out_hooks=None,
        device="cpu",
    ):
        super().__init__(d_in, d_sae, d_out, options, hooks=hooks, out_hooks=out_hooks, device=device)
        n = self.n
        self.apply_b_dec_to_input = (d_in == d_out) if apply_b_dec_to_input is None else apply_b_dec_to_input
        kw = dict(device=device, dtype=torch.float32)
        # stored latent-major, [n, d_sae, d_in]: the gradient of the sparse kinds (a sparse x dense
        # product over latents) comes out in this layout, so it needs no transposing copy; ``W_enc`` is the view
        self.W_enc_t = nn.Parameter(torch.zeros(n, d_sae, d_in, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n, d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(n, d_sae, d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(n, d_out, **kw))
        self.register_buffer("threshold", torch.zeros(n, **kw))
        self._pre_buffer: torch.Tensor | None = None  # ``pre(reuse=True)``'s storage (not state)

    @property
    def W_enc(self) -> torch.Tensor:
        """[n, d_in, d_sae]: a view of the stored ``W_enc_t`` (writable)."""
        return self.W_enc_t.transpose(1, 2)

    @classmethod
    def build(cls, d_in, d_sae, d_out=None, n=1, *, apply_b_dec_to_input: bool | None = None, **kw) -> SAE:
        sae = super().build(d_in, d_sae, d_out, n, **kw)
        if apply_b_dec_to_input is not None:
            sae.apply_b_dec_to_input = apply_b_dec_to_input
        return sae

    @torch.no_grad()
    def initialize(self, generators: list[torch.Generator], dec_norm: float | None = None) -> None:
        """Decoder rows random with norm ``dec_norm`` (default: the kind's ``init_decoder_norm``, as in
        training); encoder = decoder transpose (tied init), its rows at ``encoder_init_norm``."""
        dec_norm = self.init_decoder_norm if dec_norm is None else dec_norm
        for m, gen in enumerate(generators):
            w = torch.randn(self.d_sae, self.d_out, generator=gen)
            w = w / w.norm(dim=1, keepdim=True)
            self.W_dec[m] = (w * dec_norm).to(self.W_dec.device)
            if self.d_in != self.d_out:
                w = torch.randn(self.d_sae, self.d_in, generator=gen)
                w = w / w.norm(dim=1, keepdim=True)
            self.W_enc[m] = (w * self.encoder_init_norm(m, dec_norm)).t().to(self.W_enc.device)

    def encoder_init_norm(self, m: int, dec_norm: float) -> float:
        """Initial norm of member ``m``'s encoder rows: the decoder's, unless the kind says otherwise."""
        return dec_norm

    @torch.no_grad()
    def init_from_data(self, y: torch.Tensor, how: str) -> None:
        """b_dec: the mean or the median per dimension of ``y`` ("zeros": left at 0)."""
        if how != "zeros":
            self.b_dec.copy_((y.mean(0) if how == "mean" else y.median(0).values).expand(self.n, -1))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def pre(self, x: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """[B, d_in] (shared by all members) -> pre-activations [n, B, d_sae]. ``reuse`` (no autograd;
        training steps): written into a buffer kept for the next call, so the largest tensor of the step
        is not allocated afresh each step (a fresh 75 MB tensor costs ~18 ms of page faults here)."""
        bias = self.b_enc
        if self.apply_b_dec_to_input:
            bias = bias - torch.bmm(self.b_dec.unsqueeze(1), self.W_enc).squeeze(1)
        out = self._workspace(x.shape[0]) if reuse else None
        # GEMM, then the bias in place (addmm/baddbmm would first copy the broadcast bias into the
        # [B, d_sae] output: one more pass over the largest tensor of the step)
        with dense_threads():
            if self.n == 1:
                return torch.mm(x, self.W_enc[0], out=None if out is None else out[0]).add_(bias).unsqueeze(0)
            return torch.bmm(x.expand(self.n, *x.shape), self.W_enc, out=out).add_(bias.unsqueeze(1))

    def _workspace(self, B: int) -> torch.Tensor:
        """A contiguous [n, B, d_sae] view of a flat buffer that grows to the largest batch seen."""
        size, buf = self.n * B * self.d_sae, self._pre_buffer
        if buf is None or buf.numel() < size or buf.device != self.W_enc_t.device:
            buf = self._pre_buffer = torch.empty(size, device=self.W_enc_t.device)
        return buf[:size].view(self.n, B, self.d_sae)

    def decode(self, codes: Codes, bias: bool = True) -> torch.Tensor:
        """-> [n, B, d_out] (``bias=False``: without b_dec, for AuxK)."""
        if codes.acts is not None:
            return torch.baddbmm(self.b_dec.unsqueeze(1), codes.acts, self.W_dec)
        return _SparseDecode.apply(codes.vals, self.W_dec, self.b_dec if bias else None, codes.pat)

    def decoder_directions(self, m: int = 0) -> torch.Tensor:
        return self.W_dec[m].detach()

    def member_state(self, m: int) -> dict[str, torch.Tensor]:
        out = {"W_enc": self.W_enc[m], "b_enc": self.b_enc[m], "W_dec": self.W_dec[m], "b_dec": self.b_dec[m]}
        return {k: v.detach().clone().contiguous() for k, v in (out | self._member_threshold(m)).items()}

    def _member_threshold(self, m: int) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def load_member(self, m: int, state: Mapping[str, torch.Tensor]) -> None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(self, name)[m] = state[name]

    def member_buffers(self, m: int) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold[m : m + 1]}

    @torch.no_grad()
    def load_member_buffers(self, m: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self.threshold[m] = tensors["threshold"][0]

    @classmethod
    def fold(cls, state, s_in, s_out):
        """With c the geometric mean of s_in: W_enc' = diag(s_in/c)·W_enc, b_enc' = b_enc/c,
        thresholds' = thresholds/c (latents are divided by c), W_dec' = W_dec·diag(c/s_out),
        b_dec' = b_dec/s_out. For one hook (c = s_in = s_out) the decoder is unchanged."""
        c = float(torch.exp(torch.log(s_in).mean()))
        out = dict(state)
        out["W_enc"] = state["W_enc"] * (s_in / c).unsqueeze(1)
        out["b_enc"] = state["b_enc"] / c
        out["W_dec"] = state["W_dec"] * (c / s_out).unsqueeze(0)
        out["b_dec"] = state["b_dec"] / s_out
        if "threshold" in state:
            out["threshold"] = state["threshold"] / c
        return out


# -- ReLU and JumpReLU: dense codes, a sparsity penalty --------------------------------------------
@dataclass
class ReLUOptions(Options):
    l1: float = option(5.0, "Sparsity coefficient (L1 of the latents, decoder-norm weighted)")
    sparsity_warmup: float = option(0.05, "Fraction of the steps over which the sparsity coefficient ramps up")

    def resolve(self, d_in, d_sae, where):
        if self.l1 < 0:
            raise UserError(f"{where}: l1 must be non-negative, got {self.l1}")
        fraction(self.sparsity_warmup, "sparsity_warmup", where)


class _Penalized(SAE):
    """Dense codes and a sparsity penalty whose coefficient (``l1``, per member) warms up."""

    stackable = ("l1",)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.register_buffer(
            "l1_t",
            torch.tensor([o.l1 for o in self.options], dtype=torch.float32, device=self.device),
            persistent=False,
        )

    def schedule(self, step, total):
        sw = max(1, round(self.options[0].sparsity_warmup * total))
        return self.l1_t * min(1.0, (step + 1) / sw), None


@register
class ReLU(_Penalized):
    name = "relu"
    Options = ReLUOptions
    unit_norm_decoder = False
    init_decoder_norm = 0.1
    saelens_imports = ("standard",)

    def encode(self, x, k=None, *, training=False, comm=None):
        pre = self.pre(x)
        return Codes(self.n, x.shape[0], self.d_sae, acts=F.relu(pre), vals=pre)

    def penalty(self, codes, N):
        return (codes.acts * self.W_dec.norm(dim=-1).unsqueeze(1)).sum(-1).sum(-1) / N

    @classmethod
    def saelens_export(cls, options):
        return SAELensFormat("standard")


@dataclass
class JumpReLUOptions(ReLUOptions):
    l1: float = option(1.0, "Sparsity coefficient (L0 of the latents)")
    bandwidth: float = option(0.05, "Width of the threshold's straight-through kernel")
    init_threshold: float = option(1.0, "Initial threshold in normalised units (pre-activations start about N(0, 1))")

    def resolve(self, d_in, d_sae, where):
        super().resolve(d_in, d_sae, where)
        if self.bandwidth <= 0 or self.init_threshold <= 0:
            raise UserError(f"{where}: bandwidth and init_threshold must be positive")


@register
class JumpReLU(_Penalized):
    """pre·H(pre − θ) with a learnable log-threshold per latent; L0 penalty, straight-through gradients."""

    name = "jumprelu"
    Options = JumpReLUOptions
    saelens_imports = ("jumprelu",)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        o = self.options[0]
        self.bandwidth = o.bandwidth
        self.log_threshold = nn.Parameter(
            torch.full((self.n, self.d_sae), math.log(o.init_threshold), device=self.device, dtype=torch.float32)
        )

    @property
    def theta(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode(self, x, k=None, *, training=False, comm=None):
        pre = self.pre(x)
        acts = _JumpReLU.apply(pre, self.theta.unsqueeze(1), self.bandwidth)
        return Codes(self.n, x.shape[0], self.d_sae, acts=acts, vals=pre)  # vals: pre, for the L0 penalty

    def penalty(self, codes, N):
        return _Step.apply(codes.vals, self.theta.unsqueeze(1), self.bandwidth).sum(-1).sum(-1) / N

    def _member_threshold(self, m):
        return {"threshold": self.theta[m]}

    @torch.no_grad()
    def load_member(self, m, state):
        super().load_member(m, state)
        self.log_threshold[m] = state["threshold"].clamp_min(1e-30).log()

    @classmethod
    def saelens_export(cls, options):
        return SAELensFormat("jumprelu")

    @classmethod
    def saelens_import(cls, scfg, weights, where):
        if "threshold" not in weights:
            raise UserError(f"{where}: a jumprelu SAE needs a threshold tensor")
        return {}
