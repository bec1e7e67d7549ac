"""The sparse kernels shared by dictionary kinds (``train/dictionaries/``): latents as (token, latent)
pairs, and autograd functions that encode, decode and take gradients on those pairs only.

``Pattern`` sorts a step's selected pairs latent-major once; that order serves the decoder
(embedding_bag) and both weight gradients (CSR sparse x dense). The small ops here run on one
thread (``sparse_section``): on few busy cores OpenMP hand-offs cost more than the work.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # used for one op


@dataclass
class Codes:
    """Latents of a batch for all members: sparse (``bag``/``lat``/``vals``) or dense ``acts``.

    Sparse: entry ``i`` is latent ``lat[i]`` (0..d_sae-1) of row ``bag[i]`` (= member·B + token),
    with value ``vals[i]`` (may be 0); ``bag`` is sorted. ``pat`` holds the index structure and
    ``pre`` the pre-activations [n, B, d_sae] (no grad; training reuses them for AuxK).
    """

    n: int
    B: int
    d_sae: int
    bag: torch.Tensor | None = None
    lat: torch.Tensor | None = None
    vals: torch.Tensor | None = None
    acts: torch.Tensor | None = None  # [n, B, d_sae]
    pat: Pattern | None = None
    pre: torch.Tensor | None = None

    def l0(self) -> torch.Tensor:
        """[n]: mean number of non-zero latents per token."""
        if self.acts is not None:
            return (self.acts != 0).sum(-1).float().mean(-1)
        return self.pat.member_sums((self.vals.detach() != 0).float()) / self.B

    def fired(self) -> torch.Tensor:
        """[n, d_sae] bool: latents non-zero on at least one token of the batch."""
        if self.acts is not None:
            return (self.acts != 0).any(1)
        out = torch.zeros(self.n * self.d_sae, dtype=torch.bool, device=self.bag.device)
        with _one_thread():
            out[self.pat.flat[self.vals.detach() != 0]] = True
        return out.view(self.n, self.d_sae)

    def dense(self) -> torch.Tensor:
        if self.acts is not None:
            return self.acts
        out = torch.zeros(self.n * self.B, self.d_sae, dtype=self.vals.dtype, device=self.vals.device)
        out[self.bag, self.lat] = self.vals
        return out.view(self.n, self.B, self.d_sae)


def _one_thread():
    """Index bookkeeping (sort, bincount, scatter) on one thread: with OpenMP's spinning waits on
    a busy machine, a 2-thread argsort of 100k ints takes 100x longer than a 1-thread one."""
    return _Threads(1)


class _Threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        if self.before != self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.before != self.n:
            torch.set_num_threads(self.before)


SPARSE_THREADS = int(os.environ.get("SAELAKE_SPARSE_THREADS", "1"))
_DENSE: list[int] = []


class sparse_section:
    """A training step: the ops that take milliseconds each (encoder GEMM, top-k, the decoder's
    embedding_bag, the sampled and sparse x dense products of the backward) keep every thread torch
    had when the step began; everything else (index bookkeeping, gathers, elementwise ops, Adam) runs
    on ``SPARSE_THREADS`` (default 1, env SAELAKE_SPARSE_THREADS): these ops are small, and OpenMP's
    spin-waits make them several times slower on 2 threads once other jobs share the cores."""

    def __enter__(self):
        self.outer = torch.get_num_threads()
        _DENSE.append(self.outer)
        torch.set_num_threads(min(SPARSE_THREADS, self.outer))

    def __exit__(self, *exc):
        _DENSE.pop()
        torch.set_num_threads(self.outer)


def dense_threads() -> _Threads:
    return _Threads(_DENSE[-1] if _DENSE else torch.get_num_threads())


def keep_freed_memory() -> None:
    """Training allocates the same tensors every step. glibc hands blocks over its mmap threshold back
    to the kernel when freed, and the next step's copy then pays a page fault per 4 KiB (a fresh
    [4096, 576] float32 batch: ~2 ms). Serving blocks up to 32 MiB (glibc's largest threshold) from the
    heap, and not trimming it, makes that reuse free. Linux/glibc only; elsewhere nothing happens."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class Pattern:
    """Where the non-zero latents of a batch are, for ``n`` members: entry ``i`` is latent ``lat[i]``
    of row ``bag[i]`` (= member·B + token); entries are sorted by row, ``crow`` [n·B + 1] are the
    row pointers. The latent-major order (for the weight gradients) is computed once and shared by
    the encoder's and the decoder's backward."""

    def __init__(self, n: int, B: int, S: int, bag: torch.Tensor, lat: torch.Tensor, crow: torch.Tensor):
        self.n, self.B, self.S, self.bag, self.lat, self.crow = n, B, S, bag, lat, crow
        self.flat = lat if n == 1 else (bag // B) * S + lat  # row of the stacked [n·S, d] weights
        self._t = None

    @staticmethod
    def from_counts(n: int, B: int, S: int, counts: torch.Tensor, lat: torch.Tensor) -> Pattern:
        """The pattern of ``counts[r]`` entries per row ``r`` (row-major ``lat``)."""
        with _one_thread():
            crow = torch.zeros(n * B + 1, dtype=torch.long, device=lat.device)
            crow[1:] = counts.cumsum(0)
            bag = torch.arange(n * B, device=lat.device).repeat_interleave(counts, output_size=len(lat))
        return Pattern(n, B, S, bag, lat, crow)

    @property
    def tok(self) -> torch.Tensor:
        return self.bag if self.n == 1 else self.bag % self.B

    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._t is None:
            with _one_thread():
                perm = torch.argsort(self.flat, stable=True)
                crow_t = torch.zeros(self.n * self.S + 1, dtype=torch.long, device=self.flat.device)
                crow_t[1:] = torch.bincount(self.flat, minlength=self.n * self.S).cumsum(0)
            self._t = perm, crow_t
        return self._t

    def t_mm(self, values: torch.Tensor, cols: torch.Tensor, n_cols: int, dense: torch.Tensor) -> torch.Tensor:
        """``Aᵀ @ dense`` with A [n_cols, n·S] holding ``values`` at (cols[i], flat[i]): [n·S, d]."""
        perm, crow_t = self.by_latent()
        with _one_thread():
            col, val = cols[perm], values[perm]
        At = torch.sparse_csr_tensor(
            crow_t, col, val.to(dense.dtype), (self.n * self.S, n_cols), check_invariants=False
        )
        with dense_threads():
            return torch.sparse.mm(At, dense)

    def sampled(self, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``g[bag[i]] · W[flat[i]]`` for every entry (a sampled dense-dense product)."""
        pattern = torch.sparse_csr_tensor(
            self.crow,
            self.flat,
            torch.zeros_like(self.flat, dtype=g.dtype),
            (self.n * self.B, self.n * self.S),
            check_invariants=False,
        )
        with dense_threads():
            return torch.sparse.sampled_addmm(pattern, g.contiguous(), W.t(), beta=0).values()

    def member_sums(self, v: torch.Tensor) -> torch.Tensor:
        """[n]: sum of per-entry ``v`` over each member's entries."""
        cs = torch.zeros(len(v) + 1, dtype=v.dtype, device=v.device)
        torch.cumsum(v, 0, out=cs[1:])
        ends = cs[self.crow[:: self.B]]
        return ends[1:] - ends[:-1]

    def member_slices(self) -> list[slice]:
        b = self.crow[:: self.B].tolist()
        return [slice(b[m], b[m + 1]) for m in range(self.n)]


class _SparseEncode(torch.autograd.Function):
    """relu(pre) at the selected entries (``pre_vals``, computed without grad); the backward touches
    only those entries: b_enc by index_add, W_enc by a sparse x dense product."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, pre_vals, pat, apply_b_dec):
        pre_vals = pre_vals.float()
        ctx.save_for_backward(x, b_dec, W_enc, pre_vals)
        ctx.pat, ctx.apply_b_dec = pat, apply_b_dec
        return F.relu(pre_vals)

    @staticmethod
    def backward(ctx, g):
        x, b_dec, W_enc, pre_vals = ctx.saved_tensors
        pat = ctx.pat
        n, S = pat.n, pat.S
        g = g * (pre_vals > 0)
        with _one_thread():
            g_b_enc = torch.zeros(n * S, dtype=g.dtype, device=g.device).index_add_(0, pat.flat, g).view(n, S)
        g_Wt = pat.t_mm(g, pat.tok, pat.B, x.to(g.dtype)).view(n, S, -1)  # dL/dW_enc, transposed
        g_b_dec = None
        if ctx.apply_b_dec:  # pre = (x - b_dec) W_enc + b_enc
            g_Wt.baddbmm_(g_b_enc.unsqueeze(2), b_dec.unsqueeze(1), alpha=-1)
            g_b_dec = -torch.bmm(W_enc, g_b_enc.unsqueeze(2)).squeeze(2)
        # a view: W_enc is itself the transposed view of the stored [n, S, d] parameter, whose grad this is
        return None, g_b_dec, g_Wt.transpose(1, 2), g_b_enc, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``[b_dec +] sum_i vals[i]·W_dec[member, lat[i]]`` per row (embedding_bag); sparse backward."""

    @staticmethod
    def forward(ctx, vals, W_dec, b_dec, pat):
        n, S, d = W_dec.shape
        ctx.save_for_backward(vals, W_dec)
        ctx.pat, ctx.has_bias = pat, b_dec is not None
        with dense_threads():
            out = F.embedding_bag(
                pat.flat, W_dec.reshape(n * S, d), pat.crow[:-1], mode="sum", per_sample_weights=vals.to(W_dec.dtype)
            ).view(n, pat.B, d)
        if b_dec is not None:
            out += b_dec.unsqueeze(1)
        return out

    @staticmethod
    def backward(ctx, g):
        vals, W_dec = ctx.saved_tensors
        pat = ctx.pat
        n, S, d = W_dec.shape
        g2 = g.reshape(n * pat.B, d)
        g_vals = g_W = g_b = None
        if ctx.needs_input_grad[0]:
            g_vals = pat.sampled(g2, W_dec.reshape(n * S, d))
        if ctx.needs_input_grad[1]:
            g_W = pat.t_mm(vals, pat.bag, n * pat.B, g2).view(n, S, d)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g_b = g.sum(1)
        return g_vals, g_W, g_b, None


class _SqErr(torch.autograd.Function):
    """Per-row squared error ``||y_hat - y||²`` [n, B] (y shared by the members), fused backward."""

    @staticmethod
    def forward(ctx, y_hat, y):
        err = y_hat - y
        ctx.save_for_backward(err)
        return torch.linalg.vecdot(err, err)

    @staticmethod
    def backward(ctx, g):
        (err,) = ctx.saved_tensors
        return err.mul_(2 * g.unsqueeze(-1)), None


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
