"""One model family: ``SparseCoder`` holds ``n`` stacked sparse coders of one shape.

An SAE maps ``x [B, d_in]`` (one hook, or several hooks concatenated for a crosscoder) to
latents ``f [B, d_sae]`` and back to ``y_hat [B, d_out]`` (the same hooks for an SAE, other
hooks for a transcoder). Parameters carry a leading member dimension ``n`` so that a sweep
steps every same-shape SAE with batched matmuls; each member is an independent SAE.

    pre   = (x - b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc       W_enc [n, d_in, d_sae]
    f     = relu(pre) | topk(relu(pre), k) | batch-topk | pre·H(pre - θ)  (JumpReLU)
    y_hat = f @ W_dec + b_dec                                          W_dec [n, d_sae, d_out]

TopK and BatchTopK never build the dense ``f``: the encoder's backward, the decoder and its
backward run on the selected (token, latent) pairs only (embedding_bag, sampled matmul,
sparse×dense products), so only the encoder's forward matmul is dense.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # used for one op
ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
SPARSE_ARCHS = ("topk", "batchtopk")


@dataclass
class Codes:
    """Latents of a batch for all members: sparse (``bag``/``lat``/``vals``) or dense ``acts``.

    Sparse: entry ``i`` is latent ``lat[i]`` (0..d_sae-1) of row ``bag[i]`` (= member·B + token),
    with value ``vals[i]`` (may be 0 for masked entries); ``bag`` is sorted.
    """
    n: int
    B: int
    d_sae: int
    bag: torch.Tensor | None = None
    lat: torch.Tensor | None = None
    vals: torch.Tensor | None = None
    acts: torch.Tensor | None = None  # [n, B, d_sae]

    def l0(self) -> torch.Tensor:
        """[n]: mean number of non-zero latents per token."""
        if self.acts is not None:
            return (self.acts != 0).sum(-1).float().mean(-1)
        nz = (self.vals != 0).float()
        return torch.zeros(self.n * self.B, device=nz.device).index_add_(0, self.bag, nz).view(self.n, self.B).mean(-1)

    def fired(self) -> torch.Tensor:
        """[n, d_sae] bool: latents non-zero on at least one token of the batch."""
        if self.acts is not None:
            return (self.acts != 0).any(1)
        member = self.bag // self.B
        out = torch.zeros(self.n * self.d_sae, dtype=torch.bool, device=self.bag.device)
        out[(member * self.d_sae + self.lat)[self.vals != 0]] = True
        return out.view(self.n, self.d_sae)

    def dense(self) -> torch.Tensor:
        if self.acts is not None:
            return self.acts
        out = torch.zeros(self.n * self.B, self.d_sae, dtype=self.vals.dtype, device=self.vals.device)
        out[self.bag, self.lat] = self.vals
        return out.view(self.n, self.B, self.d_sae)


class _SparseEncode(torch.autograd.Function):
    """``pre`` at the selected entries; backward touches only those entries (no dense grad)."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, pre, bag, lat, apply_b_dec):
        n, B, S = pre.shape
        ctx.save_for_backward(x, b_dec, W_enc, bag, lat)
        ctx.apply_b_dec, ctx.shape = apply_b_dec, (n, B, S)
        return pre.reshape(n * B, S)[bag, lat]

    @staticmethod
    def backward(ctx, g):
        x, b_dec, W_enc, bag, lat = ctx.saved_tensors
        n, B, S = ctx.shape
        member, tok = bag // B, bag % B
        flat = member * S + lat
        g_b_enc = torch.zeros(n * S, dtype=g.dtype, device=g.device).index_add_(0, flat, g)
        # dL/dW_enc[m, :, j] = sum_b g[m,b,j] * (x_b - b_dec_m): a sparse [n*S, B] @ dense [B, d_in]
        At = torch.sparse_coo_tensor(torch.stack([flat, tok]), g, (n * S, B), check_invariants=False)
        g_W = torch.sparse.mm(At, x.to(g.dtype)).view(n, S, -1)
        g_b_dec = None
        if ctx.apply_b_dec:
            g_W = g_W - g_b_enc.view(n, S, 1) * b_dec.view(n, 1, -1)
            g_b_dec = -torch.bmm(W_enc, g_b_enc.view(n, S, 1)).squeeze(-1)
        return None, g_b_dec, g_W.transpose(1, 2), g_b_enc.view(n, S), None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``sum_i vals[i] * W_dec[member, lat[i]]`` per bag; sparse backward for vals and W_dec."""

    @staticmethod
    def forward(ctx, vals, W_dec, bag, lat, n_bags, B):
        n, S, d = W_dec.shape
        flat = (bag // B) * S + lat
        counts = torch.bincount(bag, minlength=n_bags)
        offsets = counts.cumsum(0) - counts
        ctx.save_for_backward(vals, W_dec, bag, flat, counts)
        ctx.n_bags = n_bags
        return F.embedding_bag(flat, W_dec.reshape(n * S, d), offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, g):
        vals, W_dec, bag, flat, counts = ctx.saved_tensors
        n, S, d = W_dec.shape
        W = W_dec.reshape(n * S, d)
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:  # sampled dense-dense product: g[bag[i]] · W[flat[i]]
            crow = torch.zeros(ctx.n_bags + 1, dtype=torch.long, device=g.device)
            crow[1:] = counts.cumsum(0)
            pattern = torch.sparse_csr_tensor(crow, flat, torch.zeros_like(vals), (ctx.n_bags, n * S),
                                              check_invariants=False)
            g_vals = torch.sparse.sampled_addmm(pattern, g.contiguous(), W.t(), beta=0).values()
        if ctx.needs_input_grad[1]:
            A_t = torch.sparse_coo_tensor(torch.stack([flat, bag]), vals, (n * S, ctx.n_bags), check_invariants=False)
            g_W = torch.sparse.mm(A_t, g).view(n, S, d)
        return g_vals, g_W, None, None, None, None


class _JumpReLU(torch.autograd.Function):
    """pre·H(pre − θ); θ gets the straight-through (rectangle kernel) pseudo-gradient."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        near = ((pre - theta).abs() < eps / 2).to(g.dtype)
        g_theta = (-(theta / eps) * near * g).sum(1, keepdim=True)
        return g * (pre > theta), g_theta, None


class _Step(torch.autograd.Function):
    """H(pre − θ) (for the L0 penalty), with the straight-through pseudo-gradient for θ."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.eps / 2).to(g.dtype)
        return None, (-(1.0 / ctx.eps) * near * g).sum(1, keepdim=True), None


class SparseCoder(nn.Module):
    """``n`` stacked sparse coders (ReLU, TopK, BatchTopK or JumpReLU) of one shape."""

    def __init__(self, arch: str, d_in: int, d_sae: int, d_out: int | None = None, n: int = 1, *,
                 k: int | list[int] | None = None, apply_b_dec_to_input: bool | None = None,
                 decoder_norm_topk: bool = False, bandwidth: float = 0.05, init_threshold: float = 0.01,
                 device: str | torch.device = "cpu"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHS)}")
        d_out = d_in if d_out is None else d_out
        self.arch, self.d_in, self.d_sae, self.d_out, self.n = arch, d_in, d_sae, d_out, n
        self.apply_b_dec_to_input = (d_in == d_out) if apply_b_dec_to_input is None else apply_b_dec_to_input
        self.decoder_norm_topk, self.bandwidth = decoder_norm_topk, bandwidth
        kw = dict(device=device, dtype=torch.float32)
        self.W_enc = nn.Parameter(torch.zeros(n, d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n, d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(n, d_sae, d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(n, d_out, **kw))
        if arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n, d_sae), math.log(init_threshold), **kw))
        ks = [k] * n if not isinstance(k, (list, tuple)) else list(k)
        self.register_buffer("k", torch.tensor([int(v or 0) for v in ks], dtype=torch.long, device=device))
        # BatchTopK at inference: a JumpReLU with one threshold per SAE, estimated in training
        self.register_buffer("threshold", torch.zeros(n, **kw))
        self.use_threshold = False  # BatchTopK: True at inference (after training)

    # -- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, generators: list[torch.Generator], dec_norm: float = 1.0) -> None:
        """Decoder rows random with norm ``dec_norm``; encoder = decoder transpose (tied init)."""
        for m, gen in enumerate(generators):
            w = torch.randn(self.d_sae, self.d_out, generator=gen)
            w = w / w.norm(dim=1, keepdim=True) * dec_norm
            self.W_dec[m] = w.to(self.W_dec.device)
            if self.d_in == self.d_out:
                self.W_enc[m] = w.t().to(self.W_enc.device)
            else:
                e = torch.randn(self.d_sae, self.d_in, generator=gen)
                self.W_enc[m] = (e / e.norm(dim=1, keepdim=True) * dec_norm).t().to(self.W_enc.device)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @property
    def theta(self) -> torch.Tensor:
        return self.log_threshold.exp()

    # -- forward -------------------------------------------------------------------------------
    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """[B, d_in] (shared by all members) -> pre-activations [n, B, d_sae]."""
        bias = self.b_enc
        if self.apply_b_dec_to_input:
            bias = bias - torch.bmm(self.b_dec.unsqueeze(1), self.W_enc).squeeze(1)
        if self.n == 1:  # one fused GEMM + bias
            return torch.addmm(bias, x, self.W_enc[0]).unsqueeze(0)
        return torch.baddbmm(bias.unsqueeze(1), x.expand(self.n, *x.shape), self.W_enc)

    def encode(self, x: torch.Tensor, k: torch.Tensor | None = None, *, training: bool = False) -> Codes:
        """Latents of ``x`` for every member. ``k`` [n] overrides the current k (annealing)."""
        n, B, S = self.n, x.shape[0], self.d_sae
        if self.arch in ("relu", "jumprelu") or (self.arch == "batchtopk" and self.use_threshold and not training):
            pre = self.pre(x)
            if self.arch == "relu":
                acts = F.relu(pre)
            elif self.arch == "jumprelu":
                acts = _JumpReLU.apply(pre, self.theta.unsqueeze(1), self.bandwidth)
            else:
                acts = pre * (pre > self.threshold.view(n, 1, 1))
            return Codes(n, B, S, acts=acts, vals=pre)  # vals: pre, for the JumpReLU L0 penalty
        k = self.k if k is None else k
        with torch.no_grad():
            pre = self.pre(x)
            score = pre * self.W_dec.norm(dim=-1).unsqueeze(1) if self.decoder_norm_topk else pre
            bag, lat = self._select(score, k)
        vals = F.relu(_SparseEncode.apply(x, self.b_dec, self.W_enc, self.b_enc, pre, bag, lat,
                                          self.apply_b_dec_to_input))
        if self.arch == "topk" and bool((k != k.max()).any()):  # members with a smaller k
            rank = torch.arange(len(bag), device=bag.device) % int(k.max())
            vals = vals * (rank < k[bag // B]).to(vals.dtype)
        return Codes(n, B, S, bag=bag, lat=lat, vals=vals)

    def _select(self, score: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, B, S = score.shape
        if self.arch == "topk":
            kmax = int(k.max())
            lat = score.topk(kmax, dim=-1, sorted=True).indices.reshape(-1)
            bag = torch.arange(n * B, device=score.device).repeat_interleave(kmax)
            return bag, lat
        # BatchTopK: the k·B largest (positive) scores of the whole batch, per member
        mask = torch.zeros(n, B * S, dtype=torch.bool, device=score.device)
        for m in range(n):  # one topk per member over its flattened batch (n is small)
            top = score[m].reshape(-1).topk(min(int(k[m]) * B, B * S), sorted=False)
            mask[m, top.indices[top.values > 0]] = True
        rows, lat = mask.view(n * B, S).nonzero(as_tuple=True)
        return rows, lat

    def decode(self, codes: Codes) -> torch.Tensor:
        """-> [n, B, d_out]."""
        if codes.acts is not None:
            return torch.baddbmm(self.b_dec.unsqueeze(1), codes.acts, self.W_dec)
        out = _SparseDecode.apply(codes.vals, self.W_dec, codes.bag, codes.lat, codes.n * codes.B, codes.B)
        return out.view(codes.n, codes.B, self.d_out) + self.b_dec.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- members ---------------------------------------------------------------------------------
    def member_state(self, m: int) -> dict[str, torch.Tensor]:
        """One member's weights in SAELens orientation (W_enc [d_in, d_sae], W_dec [d_sae, d_out])."""
        out = {"W_enc": self.W_enc[m], "b_enc": self.b_enc[m], "W_dec": self.W_dec[m], "b_dec": self.b_dec[m]}
        if self.arch == "jumprelu":
            out["threshold"] = self.theta[m]
        if self.arch == "batchtopk":
            out["threshold"] = self.threshold[m].expand(self.d_sae)
        return {k: v.detach().clone().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load_member(self, m: int, state: dict[str, torch.Tensor]) -> None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(self, name)[m] = state[name]
        if self.arch == "jumprelu":
            self.log_threshold[m] = state["threshold"].clamp_min(1e-30).log()
        if self.arch == "batchtopk":
            self.threshold[m] = state["threshold"].reshape(-1)[0]
