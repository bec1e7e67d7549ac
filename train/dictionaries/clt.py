"""Cross-layer transcoders (CLT): ``clt`` (TopK per layer) and ``clt-jumprelu``.

L input hooks I_0..I_{L-1} (e.g. each layer's MLP input, ``blocks.{0-5}.ln2.hook_out``) and L output
hooks O_0..O_{L-1} (the MLP outputs). Layer i has ``s = d_sae / L`` latents that read I_i only, and a
decoder i→j for every j ≥ i; the output at layer j sums the decoders of all layers i ≤ j:

    f_i   = act_i(x_i @ W_enc_i + b_enc_i)                       W_enc_i [n, d, s]
    y_j   = b_dec_j + Σ_{i ≤ j} f_i @ W_dec_{i→j}                W_dec_i [n, s, (L - i)·d] = [i→i | ... | i→L-1]

Latent ``i·s + l`` is latent l of layer i. The trainer sees the usual layout: the input is the input
hooks concatenated [B, L·d] and the output the out hooks concatenated, so training, sweeps, holdout,
normalization and FVU per out hook need nothing CLT-specific.

Sparsity is per layer: ``clt`` keeps the top k latents of every layer per token, with each latent's
decoders (all its output layers together) kept at unit norm, so that ranking by pre-activation is
ranking by pre-activation x decoder norm (a selection that folding the normalization into the weights
keeps), and AuxK per layer; ``clt-jumprelu`` has a learnable threshold per latent and the
decoder-norm weighted penalty λ·Σ tanh(c·f·‖W_dec,f‖) (‖W_dec,f‖: all of f's decoders together).
TopK encodes, decodes and takes gradients on the selected pairs only (``train/kernels.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from saelake.lake import UserError

from ..kernels import Codes, Pattern, _JumpReLU, _one_thread, _SparseDecode, _SparseEncode, _SqErr, dense_threads
from . import register
from .base import Dictionary, Options, fraction, option


@dataclass
class LayerCodes(Codes):
    """Codes of all layers (latent i·s + l), plus each layer's own (values, pattern) for decoding."""

    parts: list | None = None


def layer_count(hooks: list[str], out_hooks: list[str], where: str) -> int:
    if len(hooks) != len(out_hooks) or len(hooks) < 1:
        raise UserError(
            f"{where}: a cross-layer transcoder needs one out hook per input hook (--hook I0,...,In "
            f"--out-hook O0,...,On), got {len(hooks)} and {len(out_hooks)}"
        )
    return len(hooks)


class CLT(Dictionary):
    """The family's parameters (per layer, each with a leading member dimension) and shared math."""

    init_decoder_norm = 1.0

    def __init__(
        self, d_in, d_sae, d_out, options, *, hooks=None, out_hooks=None, device="cpu", apply_b_dec_to_input=None
    ):
        super().__init__(d_in, d_sae, d_out, options, hooks=hooks, out_hooks=out_hooks, device=device)
        L = self.L = layer_count(self.hooks, self.out_hooks, self.name)
        if d_in % L or d_out % L or d_sae % L:
            raise UserError(
                f"{self.name}: inputs ({d_in}), outputs ({d_out}) and latents ({d_sae}) must split "
                f"evenly over its {L} layers"
            )
        self.apply_b_dec_to_input = None  # (the SAE family's switch; a CLT has no input bias)
        n, d, s, do = self.n, d_in // L, d_sae // L, d_out // L
        self.d, self.s, self.do = d, s, do
        kw = dict(device=device, dtype=torch.float32)
        for i in range(L):
            self.register_parameter(f"W_enc_{i}", nn.Parameter(torch.zeros(n, d, s, **kw)))
            self.register_parameter(f"b_enc_{i}", nn.Parameter(torch.zeros(n, s, **kw)))
            self.register_parameter(f"W_dec_{i}", nn.Parameter(torch.zeros(n, s, (L - i) * do, **kw)))
        self.b_dec = nn.Parameter(torch.zeros(n, d_out, **kw))

    def layer(self, name: str, i: int) -> torch.Tensor:
        return getattr(self, f"{name}_{i}")

    @classmethod
    def dims(cls, w):
        L, d, s = w["W_enc"].shape
        return L * d, L * s, w["b_dec"].shape[0]

    # -- init ------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, generators, dec_norm: float | None = None) -> None:
        """Each latent's decoders (all its output layers together) random with norm ``dec_norm``;
        encoder rows random with norm 1 (pre-activations start about N(0, 1) on normalised inputs)."""
        dec_norm = self.init_decoder_norm if dec_norm is None else dec_norm
        for m, gen in enumerate(generators):
            for i in range(self.L):
                e = torch.randn(self.s, self.d, generator=gen)
                self.layer("W_enc", i)[m] = (e / e.norm(dim=1, keepdim=True)).t()
                w = torch.randn(self.s, (self.L - i) * self.do, generator=gen)
                self.layer("W_dec", i)[m] = w / w.norm(dim=1, keepdim=True) * dec_norm

    @torch.no_grad()
    def init_from_data(self, y, how):
        if how != "zeros":
            self.b_dec.copy_((y.mean(0) if how == "mean" else y.median(0).values).expand(self.n, -1))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for i in range(self.L):
            w = self.layer("W_dec", i)
            w /= w.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def decoder_norm(self, i: int) -> torch.Tensor:
        """[n, s]: norm of each layer-i latent's decoders, all output layers together."""
        return self.layer("W_dec", i).norm(dim=-1)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, L·d] -> L inputs [B, d]."""
        return list(x.split(self.d, -1))

    def pre(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Pre-activations of layer ``i``'s latents [n, B, s] from its input [B, d]."""
        with dense_threads():
            W, b = self.layer("W_enc", i), self.layer("b_enc", i)
            if self.n == 1:
                return torch.mm(x, W[0]).add_(b).unsqueeze(0)
            return torch.bmm(x.expand(self.n, *x.shape), W).add_(b.unsqueeze(1))

    # -- decode ----------------------------------------------------------------------------------
    def decode(self, codes: Codes, bias: bool = True) -> torch.Tensor:
        """-> [n, B, L·d]: out layer j = b_dec_j + Σ_{i ≤ j} f_i @ W_dec_{i→j}."""
        n, B = codes.n, codes.B
        out = (
            self.b_dec.unsqueeze(1).expand(n, B, self.d_out)
            if bias
            else self.b_dec.new_zeros(1, 1, 1).expand(n, B, self.d_out)
        ).clone()
        for i in range(self.L):  # layer i writes layers i..L-1: added in place into their columns
            out[..., i * self.do :] += self._layer_out(codes, i)
        return out

    def _layer_out(self, codes: Codes, i: int) -> torch.Tensor:
        W = self.layer("W_dec", i)
        if codes.acts is not None:
            return torch.bmm(codes.acts[..., i * self.s : (i + 1) * self.s], W)
        vals, pat = codes.parts[i] if isinstance(codes, LayerCodes) and codes.parts else self._part(codes, i)
        return _SparseDecode.apply(vals, W, None, pat)

    def _part(self, codes: Codes, i: int) -> tuple[torch.Tensor, Pattern]:
        """Layer ``i``'s entries of sparse codes made elsewhere (e.g. edited for steering)."""
        with _one_thread():
            mine = (codes.lat >= i * self.s) & (codes.lat < (i + 1) * self.s)
            counts = torch.bincount(codes.bag[mine], minlength=codes.n * codes.B)
        return codes.vals[mine], Pattern.from_counts(codes.n, codes.B, self.s, counts, codes.lat[mine] - i * self.s)

    def decoder_directions(self, m: int = 0) -> torch.Tensor:
        """[d_sae, L·d]: what each latent writes (zero in the layers before its own)."""
        out = torch.zeros(self.d_sae, self.d_out, device=self.device)
        for i in range(self.L):
            out[i * self.s : (i + 1) * self.s, i * self.do :] = self.layer("W_dec", i)[m].detach()
        return out

    def decoder_norms(self, m: int = 0) -> torch.Tensor:
        """[d_sae, L]: each latent's decoder norm into each output layer (0 before its own layer)."""
        out = torch.zeros(self.d_sae, self.L, device=self.device)
        for i in range(self.L):
            w = self.layer("W_dec", i)[m].detach()
            out[i * self.s : (i + 1) * self.s, i:] = w.view(self.s, self.L - i, self.do).norm(dim=-1)
        return out

    # -- files -----------------------------------------------------------------------------------
    def member_state(self, m: int) -> dict[str, torch.Tensor]:
        out = {
            "W_enc": torch.stack([self.layer("W_enc", i)[m] for i in range(self.L)]),
            "b_enc": torch.stack([self.layer("b_enc", i)[m] for i in range(self.L)]),
            "b_dec": self.b_dec[m],
        }
        out |= {f"W_dec_{i}": self.layer("W_dec", i)[m] for i in range(self.L)}
        return {k: v.detach().clone().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load_member(self, m: int, state) -> None:
        for i in range(self.L):
            self.layer("W_enc", i)[m] = state["W_enc"][i]
            self.layer("b_enc", i)[m] = state["b_enc"][i]
            self.layer("W_dec", i)[m] = state[f"W_dec_{i}"]
        self.b_dec[m] = state["b_dec"]

    @classmethod
    def fold(cls, state, s_in, s_out):
        """Latents stay as trained: W_enc_i' = diag(s_in_i)·W_enc_i, W_dec_i' = W_dec_i·diag(1/s_out[layers ≥ i]),
        b_dec' = b_dec/s_out (thresholds unchanged)."""
        L, d, _ = state["W_enc"].shape
        do = state["b_dec"].shape[0] // L
        out = dict(state)
        out["W_enc"] = state["W_enc"] * s_in.view(L, d, 1)
        out["b_dec"] = state["b_dec"] / s_out
        for i in range(L):
            out[f"W_dec_{i}"] = state[f"W_dec_{i}"] / s_out[i * do :].unsqueeze(0)
        return out


# -- TopK per layer ------------------------------------------------------------------------------
@dataclass
class CLTOptions(Options):
    k: int | None = option(None, "Active latents per layer per token", "32, at most the latents per layer / 2")
    aux_k: int | None = option(
        None, "AuxK: dead latents per layer in the auxiliary loss", "min(d, latents per layer)/2"
    )
    aux_coef: float = option(1 / 32, "AuxK: weight of the auxiliary loss; 0 turns it off")

    def resolve_layers(self, d: int, s: int, where: str) -> None:
        """Defaults and checks for ``s`` latents per layer, inputs of width ``d``."""
        self.k = min(32, s // 2) if self.k is None else self.k
        if not 0 < self.k < s:
            raise UserError(f"{where}: k (per layer) must be in 1..{s - 1} (latents per layer - 1), got {self.k}")
        self.aux_k = max(1, min(d // 2, s // 2)) if self.aux_k is None else self.aux_k
        if self.aux_k <= 0 or self.aux_coef < 0:
            raise UserError(f"{where}: aux_k must be positive and aux_coef non-negative")


@register
class TopKCLT(CLT):
    """The top k latents of every layer per token (decoders of unit total norm)."""

    name = "clt"
    Options = CLTOptions

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        o = self.options[0]
        o.resolve_layers(self.d, self.s, self.name)
        self.k, self.aux_k, self.aux_coef = o.k, o.aux_k, o.aux_coef

    @classmethod
    def resolve_shape(cls, options, hooks, out_hooks, widths, d_sae, where, model=None):
        L = layer_count(hooks, out_hooks, where)
        _even_layers(hooks, out_hooks, widths, d_sae, where)
        options.resolve_layers(widths[hooks[0]], d_sae // L, where)

    def encode(self, x, k=None, *, training=False, comm=None):
        n, B, s, L = self.n, x.shape[0], self.s, self.L
        k = self.k
        xs = self.split(x)
        pre = torch.empty(L, n, B, s, device=x.device, dtype=x.dtype)
        parts, lats, vals = [], [], []
        crow = torch.arange(0, n * B * k + 1, k, device=x.device)
        bag = torch.arange(n * B, device=x.device).repeat_interleave(k)
        for i in range(L):
            with torch.no_grad():
                pre[i] = self.pre(xs[i], i)
                with dense_threads():
                    top = pre[i].topk(k, dim=-1, sorted=False)
                pre_vals = top.values.reshape(-1)
            pat = Pattern(n, B, s, bag, top.indices.reshape(-1), crow)
            v = _SparseEncode.apply(xs[i], None, self.layer("W_enc", i), self.layer("b_enc", i), pre_vals, pat, False)
            parts.append((v, pat))
            lats.append(top.indices.reshape(n * B, k) + i * s)
            vals.append(v.view(n * B, k))
        lat = torch.cat(lats, 1).reshape(-1)
        allk = L * k
        pat = Pattern(
            n,
            B,
            L * s,
            torch.arange(n * B, device=x.device).repeat_interleave(allk),
            lat,
            torch.arange(0, n * B * allk + 1, allk, device=x.device),
        )
        return LayerCodes(
            n,
            B,
            self.d_sae,
            bag=pat.bag,
            lat=lat,
            vals=torch.cat(vals, 1).reshape(-1),
            pat=pat,
            pre=pre if training else None,
            parts=parts,
        )

    def aux_loss(self, x, codes, y, y_hat, dead, comm, N):
        """AuxK per layer: the top aux_k dead latents of each layer reconstruct the residual together."""
        if self.aux_coef <= 0 or not bool(dead.any()):
            return None
        e = (y - y_hat).detach()
        n, B, s = self.n, x.shape[0], self.s
        xs, pre = self.split(x), codes.pre
        contrib = []
        for i in range(self.L):
            dead_i = dead[:, i * s : (i + 1) * s]
            lats, vals, counts = [], [], []
            for m in range(n):
                with _one_thread():
                    idx = dead_i[m].nonzero().squeeze(1)
                ka = min(self.aux_k, len(idx))
                counts.append(torch.full((B,), ka, dtype=torch.long, device=x.device))
                if ka:
                    with dense_threads():
                        top = pre[i, m].index_select(1, idx).topk(ka, dim=-1, sorted=False)
                    lats.append(idx[top.indices].reshape(-1))
                    vals.append(top.values.reshape(-1))
            if not lats:
                continue
            pat = Pattern.from_counts(n, B, s, torch.cat(counts), torch.cat(lats))
            v = _SparseEncode.apply(
                xs[i], None, self.layer("W_enc", i), self.layer("b_enc", i), torch.cat(vals), pat, False
            )
            contrib.append((i, _SparseDecode.apply(v, self.layer("W_dec", i), None, pat)))
        do = self.do
        e_hat = torch.zeros_like(e)
        for i, c in contrib:  # out of place: each layer's part of the residual
            e_hat = e_hat + torch.nn.functional.pad(c, (i * do, 0))
        num = _SqErr.apply(e_hat, e).sum(-1)
        if comm.active:
            ed = e.double()
            s_ = comm.sum_(torch.cat([ed.sum(1), (ed * ed).sum((1, 2)).unsqueeze(1)], 1))
            den = (s_[:, -1] - s_[:, :-1].pow(2).sum(1) / N).float().clamp_min(1e-12)
        else:
            den = (e - e.mean(1, keepdim=True)).pow(2).sum((-1, -2)).clamp_min(1e-12)
        return torch.where(dead.any(-1), num / den, torch.zeros_like(num))


# -- JumpReLU per latent -------------------------------------------------------------------------
@dataclass
class CLTJumpReLUOptions(Options):
    l1: float = option(1.0, "Sparsity coefficient λ of λ·Σ tanh(c·f·‖W_dec,f‖)")
    tanh_scale: float = option(1.0, "c in the sparsity penalty λ·Σ tanh(c·f·‖W_dec,f‖)")
    sparsity_warmup: float = option(0.05, "Fraction of the steps over which the sparsity coefficient ramps up")
    bandwidth: float = option(0.05, "Width of the threshold's straight-through kernel")
    init_threshold: float = option(1.0, "Initial threshold in normalised units (pre-activations start about N(0, 1))")

    def resolve(self, d_in, d_sae, where):
        if self.l1 < 0 or self.tanh_scale <= 0:
            raise UserError(f"{where}: l1 must be non-negative and tanh_scale positive")
        if self.bandwidth <= 0 or self.init_threshold <= 0:
            raise UserError(f"{where}: bandwidth and init_threshold must be positive")
        fraction(self.sparsity_warmup, "sparsity_warmup", where)


@register
class JumpReLUCLT(CLT):
    """f = pre·H(pre − θ) per latent (learnable log-threshold), decoder-norm weighted tanh penalty."""

    name = "clt-jumprelu"
    Options = CLTJumpReLUOptions
    unit_norm_decoder = False  # the penalty weighs each latent by its decoder norm
    init_decoder_norm = 0.1
    stackable = ("l1",)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        o = self.options[0]
        self.bandwidth, self.tanh_scale = o.bandwidth, o.tanh_scale
        for i in range(self.L):
            self.register_parameter(
                f"log_threshold_{i}",
                nn.Parameter(
                    torch.full((self.n, self.s), math.log(o.init_threshold), device=self.device, dtype=torch.float32)
                ),
            )
        self.register_buffer(
            "l1_t",
            torch.tensor([o.l1 for o in self.options], dtype=torch.float32, device=self.device),
            persistent=False,
        )

    @classmethod
    def resolve_shape(cls, options, hooks, out_hooks, widths, d_sae, where, model=None):
        layer_count(hooks, out_hooks, where)
        _even_layers(hooks, out_hooks, widths, d_sae, where)

    def theta(self, i: int) -> torch.Tensor:
        return self.layer("log_threshold", i).exp()

    def encode(self, x, k=None, *, training=False, comm=None):
        acts, pres = [], []
        for i, xi in enumerate(self.split(x)):
            pre = self.pre(xi, i)
            acts.append(_JumpReLU.apply(pre, self.theta(i).unsqueeze(1), self.bandwidth))
            pres.append(pre)
        return Codes(self.n, x.shape[0], self.d_sae, acts=torch.cat(acts, -1), vals=torch.cat(pres, -1))

    def schedule(self, step, total):
        sw = max(1, round(self.options[0].sparsity_warmup * total))
        return self.l1_t * min(1.0, (step + 1) / sw), None

    def penalty(self, codes, N):
        norms = torch.cat([self.decoder_norm(i) for i in range(self.L)], -1)  # [n, d_sae]
        return torch.tanh(self.tanh_scale * codes.acts * norms.unsqueeze(1)).sum((-1, -2)) / N

    def member_state(self, m):
        return super().member_state(m) | {
            "threshold": torch.stack([self.theta(i)[m] for i in range(self.L)]).detach().clone()
        }

    @torch.no_grad()
    def load_member(self, m, state):
        super().load_member(m, state)
        for i in range(self.L):
            self.layer("log_threshold", i)[m] = state["threshold"][i].clamp_min(1e-30).log()


def _even_layers(hooks, out_hooks, widths, d_sae, where) -> None:
    """Every input hook has one width, every out hook one width, and the latents split evenly."""
    L = len(hooks)
    for group, what in ((hooks, "input"), (out_hooks, "output")):
        if len({widths[h] for h in group}) > 1:
            raise UserError(
                f"{where}: the {what} hooks of a cross-layer transcoder must have one width, got "
                + ", ".join(f"{h}: {widths[h]}" for h in group)
            )
    if d_sae % L:
        raise UserError(
            f"{where}: d_sae ({d_sae}) must be a multiple of the number of layers ({L}): each layer "
            "has d_sae / layers latents"
        )
