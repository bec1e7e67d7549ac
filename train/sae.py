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
sparse×dense products), so only the encoder's forward matmul is dense. The pairs are sorted
latent-major once per step (``Pattern``), and that order serves both weight gradients (CSR
sparse × dense). Stacked TopK members with different k each take their own top-k: no member
pays for another's k. AuxK reuses the step's pre-activations (no second encoder pass).
The kernels live in ``kernels.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import Codes, Pattern, _JumpReLU, _one_thread, _SparseDecode, _SparseEncode, dense_threads

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
SPARSE_ARCHS = ("topk", "batchtopk")


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
        # GEMM, then the bias in place (addmm/baddbmm would first copy the broadcast bias into the
        # [B, d_sae] output: one more pass over the largest tensor of the step)
        with dense_threads():
            if self.n == 1:
                return torch.mm(x, self.W_enc[0]).add_(bias).unsqueeze(0)
            return torch.bmm(x.expand(self.n, *x.shape), self.W_enc).add_(bias.unsqueeze(1))

    def encode(self, x: torch.Tensor, k: torch.Tensor | None = None, *, training: bool = False,
               comm=None) -> Codes:
        """Latents of ``x`` for every member. ``k`` [n] overrides the current k (annealing).
        ``comm`` (data-parallel training): BatchTopK selects over the global batch of all ranks."""
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
        ks = [int(v) for v in (self.k if k is None else k).tolist()] if not isinstance(k, list) else k
        with torch.no_grad():
            pre = self.pre(x)
            score = pre * self.W_dec.norm(dim=-1).unsqueeze(1).to(pre.dtype) if self.decoder_norm_topk else pre
            pat, pre_vals = self._select(pre, score, ks, comm)
        vals = _SparseEncode.apply(x, self.b_dec, self.W_enc, self.b_enc, pre_vals, pat, self.apply_b_dec_to_input)
        return Codes(n, B, S, bag=pat.bag, lat=pat.lat, vals=vals, pat=pat, pre=pre if training else None)

    def _select(self, pre: torch.Tensor, score: torch.Tensor, ks: list[int],
                comm=None) -> tuple[Pattern, torch.Tensor]:
        """-> (pattern, pre-activations at its entries). TopK: each member's own k per token (one
        topk call when the members share k); BatchTopK: the k·B largest positive scores per member
        (with ``comm``: of the global batch, so data-parallel selects what one process would)."""
        n, B, S = score.shape
        dev = score.device
        if self.arch == "topk":
            if len(set(ks)) == 1:
                k = ks[0]
                with dense_threads():
                    top = score.topk(k, dim=-1, sorted=False)
                lat = top.indices.reshape(-1)
                vals = top.values if score is pre else pre.gather(-1, top.indices)
                crow = torch.arange(0, n * B * k + 1, k, device=dev)
                bag = torch.arange(n * B, device=dev).repeat_interleave(k)
                return Pattern(n, B, S, bag, lat, crow), vals.reshape(-1)
            lats, vals, counts = [], [], []
            for m, k in enumerate(ks):  # members with different k: each pays for its own k only
                with dense_threads():
                    top = score[m].topk(k, dim=-1, sorted=False)
                lats.append(top.indices.reshape(-1))
                vals.append((top.values if score is pre else pre[m].gather(-1, top.indices)).reshape(-1))
                counts.append(torch.full((B,), k, dtype=torch.long, device=dev))
            return self._pattern(n, B, S, torch.cat(counts), torch.cat(lats)), torch.cat(vals)
        lats, vals, counts = [], [], []
        world = comm.world if comm is not None else 1
        for m in range(n):  # BatchTopK: one topk per member over its flattened batch (n is small)
            want = ks[m] * B * world  # k per token of the global batch
            with dense_threads():
                top = score[m].reshape(-1).topk(min(want, B * S), sorted=False)
            keep = top.values > 0
            if world > 1:  # the global want-th largest score: every rank's local candidates hold it
                cand = torch.full((want,), -math.inf, dtype=top.values.dtype, device=dev)
                cand[:len(top.values)] = top.values
                everyone = comm.gather_rows(cand)
                keep &= top.values >= everyone.topk(want, sorted=False).values.min()
            with _one_thread():
                idx = top.indices[keep].sort().values  # row-major: sorted by token
                rows = idx // S
                lats.append(idx - rows * S)
                vals.append(pre[m].reshape(-1)[idx])
                counts.append(torch.bincount(rows, minlength=B))
        return self._pattern(n, B, S, torch.cat(counts), torch.cat(lats)), torch.cat(vals)

    @staticmethod
    def _pattern(n: int, B: int, S: int, counts: torch.Tensor, lat: torch.Tensor) -> Pattern:
        with _one_thread():
            crow = torch.zeros(n * B + 1, dtype=torch.long, device=lat.device)
            crow[1:] = counts.cumsum(0)
            bag = torch.arange(n * B, device=lat.device).repeat_interleave(counts, output_size=len(lat))
        return Pattern(n, B, S, bag, lat, crow)

    def aux_codes(self, x: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, aux_k: int) -> Codes:
        """AuxK: per member, the top ``aux_k`` dead latents of each token (from the batch's
        pre-activations ``pre``, no second encoder pass); members without dead latents get none."""
        n, B, S = pre.shape
        lats, vals, counts = [], [], []
        for m in range(n):
            with _one_thread():
                idx = dead[m].nonzero().squeeze(1)
            ka = min(aux_k, len(idx))
            counts.append(torch.full((B,), ka, dtype=torch.long, device=pre.device))
            if ka:
                with dense_threads():
                    sub = pre[m] if len(idx) == S else pre[m].index_select(1, idx)
                    top = sub.topk(ka, dim=-1, sorted=False)
                lats.append((top.indices if len(idx) == S else idx[top.indices]).reshape(-1))
                vals.append(top.values.reshape(-1))
        pat = self._pattern(n, B, S, torch.cat(counts), torch.cat(lats))
        v = _SparseEncode.apply(x, self.b_dec, self.W_enc, self.b_enc, torch.cat(vals), pat, self.apply_b_dec_to_input)
        return Codes(n, B, S, bag=pat.bag, lat=pat.lat, vals=v, pat=pat)

    def decode(self, codes: Codes, bias: bool = True) -> torch.Tensor:
        """-> [n, B, d_out] (``bias=False``: without b_dec, for AuxK)."""
        if codes.acts is not None:
            return torch.baddbmm(self.b_dec.unsqueeze(1), codes.acts, self.W_dec)
        return _SparseDecode.apply(codes.vals, self.W_dec, self.b_dec if bias else None, codes.pat)

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
