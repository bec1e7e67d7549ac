"""TopK and BatchTopK: sparse codes (never a dense [B, d_sae] in training) and AuxK for dead latents.

The family's parameters and shared math are ``sae.SAE``; the sparse kernels are ``train/kernels.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from saelake.lake import UserError

from ..kernels import Codes, Pattern, _one_thread, _SparseEncode, _SqErr, dense_threads
from . import register
from .base import Options, SAELensFormat, fraction, option
from .sae import SAE, JumpReLU

K_DEFAULT = 32  # latents per token, at most d_sae/2
# Encoder rows start at this norm (decoder rows at 1, same directions): nn.Linear's default init, as
# sparsify's. Against norm 1 it lowered held-out FVU by 3.6% at sparsify's settings (bench/vs_sparsify.py).
INIT_ENCODER_NORM = 3**-0.5


@dataclass
class TopKOptions(Options):
    k: int | None = option(None, "Active latents per token", f"{K_DEFAULT}, at most d_sae/2")
    k_start: int | None = option(None, "k annealing: start at this k, reach k after k_anneal of the steps")
    k_anneal: float = option(0.0, "k annealing: fraction of the steps")
    aux_k: int | None = option(None, "AuxK: dead latents in the auxiliary loss", "min(d_in, d_sae)/2")
    aux_coef: float = option(1 / 32, "AuxK: weight of the auxiliary loss; 0 turns it off")
    decoder_norm_topk: bool = option(False, "Select the top k by pre-activation x decoder norm")
    init_encoder_norm: float = option(
        INIT_ENCODER_NORM, "Initial norm of the encoder rows (decoder rows: 1, same directions)", "1/sqrt(3)"
    )

    def resolve(self, d_in, d_sae, where):
        if self.k is None:
            self.k = min(K_DEFAULT, d_sae // 2)
        if not 0 < self.k < d_sae:
            raise UserError(f"{where}: k must be in 1..d_sae-1 ({d_sae - 1}), got {self.k}")
        if self.k_start is not None and not self.k <= self.k_start <= d_sae:
            raise UserError(f"{where}: k_start must be in k..d_sae, got {self.k_start}")
        fraction(self.k_anneal, "k_anneal", where)
        if self.aux_k is None:
            self.aux_k = max(1, min(d_in // 2, d_sae // 2))
        if self.aux_k <= 0 or self.aux_coef < 0:
            raise UserError(f"{where}: aux_k must be positive and aux_coef non-negative")
        if self.init_encoder_norm <= 0:
            raise UserError(f"{where}: init_encoder_norm must be positive, got {self.init_encoder_norm}")


@register
class TopK(SAE):
    """The k largest pre-activations per token (each member its own k; annealed from k_start)."""

    name = "topk"
    Options = TopKOptions
    # 8x sparsify's rule: with warm-up and decay it lowered held-out FVU from 0.323 to 0.255 on SmolLM2
    # layer 15, d_sae 4608, k 32, 2M tokens (2x: 0.288, 4x: 0.266, 16x: 0.254 but worse on massive
    # tokens); bench/vs_sparsify.py
    lr_base = 1.6e-3
    stackable = ("k", "init_encoder_norm")
    saelens_imports = ("topk",)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        o = self.options[0]
        self.decoder_norm_topk, self.aux_k, self.aux_coef = o.decoder_norm_topk, o.aux_k, o.aux_coef
        self.k_end = [o.k for o in self.options]
        self.k_start = [o.k_start or o.k for o in self.options]
        self.register_buffer("k", torch.tensor(self.k_end, dtype=torch.long, device=self.device))

    def encoder_init_norm(self, m: int, dec_norm: float) -> float:
        return self.options[m].init_encoder_norm * dec_norm

    def schedule(self, step, total):
        anneal = round(self.options[0].k_anneal * total)
        frac = min(1.0, step / anneal) if anneal else 1.0
        k = [round(s + (e - s) * frac) for s, e in zip(self.k_start, self.k_end)]
        return torch.zeros(self.n, device=self.device), k

    def encode(self, x, k=None, *, training=False, comm=None):
        """Latents of ``x`` for every member. ``k`` [n] overrides the current k (annealing).
        ``comm`` (data-parallel training): BatchTopK selects over the global batch of all ranks."""
        n, B, S = self.n, x.shape[0], self.d_sae
        ks = [int(v) for v in (self.k if k is None else k).tolist()] if not isinstance(k, list) else k
        with torch.no_grad():
            pre = self.pre(x, reuse=training)  # training: the step drops its codes (and pre) before the next
            score = pre * self.W_dec.norm(dim=-1).unsqueeze(1).to(pre.dtype) if self.decoder_norm_topk else pre
            pat, pre_vals = self._select(pre, score, ks, comm)
        vals = _SparseEncode.apply(x, self.b_dec, self.W_enc, self.b_enc, pre_vals, pat, self.apply_b_dec_to_input)
        return Codes(n, B, S, bag=pat.bag, lat=pat.lat, vals=vals, pat=pat, pre=pre if training else None)

    def _select(self, pre, score, ks, comm=None) -> tuple[Pattern, torch.Tensor]:
        """-> (pattern, pre-activations at its entries): each member's own k per token (one topk
        call when the members share k)."""
        n, B, S = score.shape
        dev = score.device
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
        return Pattern.from_counts(n, B, S, torch.cat(counts), torch.cat(lats)), torch.cat(vals)

    def aux_codes(self, x, pre, dead, aux_k) -> Codes:
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
        pat = Pattern.from_counts(n, B, S, torch.cat(counts), torch.cat(lats))
        v = _SparseEncode.apply(x, self.b_dec, self.W_enc, self.b_enc, torch.cat(vals), pat, self.apply_b_dec_to_input)
        return Codes(n, B, S, bag=pat.bag, lat=pat.lat, vals=v, pat=pat)

    def aux_loss(self, x, codes, y, y_hat, dead, comm, N):
        """AuxK: reconstruct the residual with the top ``aux_k`` dead latents (normalised MSE)."""
        if self.aux_coef <= 0 or not bool(dead.any()):
            return None
        e = (y - y_hat).detach()
        with torch.no_grad():
            pre = codes.pre if codes.pre.dtype == torch.float32 else codes.pre.float()
        ac = self.aux_codes(x, pre, dead, self.aux_k)
        e_hat = self.decode(ac, bias=False)
        num = _SqErr.apply(e_hat, e).sum(-1)
        if comm.active:  # the residual's variance over the global batch
            ed = e.double()
            s = comm.sum_(torch.cat([ed.sum(1), (ed * ed).sum((1, 2)).unsqueeze(1)], 1))
            den = (s[:, -1] - s[:, :-1].pow(2).sum(1) / N).float().clamp_min(1e-12)
        else:
            den = (e - e.mean(1, keepdim=True)).pow(2).sum((-1, -2)).clamp_min(1e-12)
        return torch.where(dead.any(-1), num / den, torch.zeros_like(num))

    @classmethod
    def saelens_export(cls, options):
        return SAELensFormat("topk", "topk", {"k": options.k}, {"k": options.k})

    @classmethod
    def saelens_import(cls, scfg, weights, where):
        k = scfg.get("k") or (scfg.get("activation_fn_kwargs") or {}).get("k")
        if not k:
            raise UserError(f"{where}: a topk SAE needs k in cfg.json")
        return {"k": int(k)}


@register
class BatchTopK(TopK):
    """The k·B largest pre-activations of a batch of B tokens (k per token on average). At inference
    a JumpReLU with one threshold per member, estimated in training: a moving average of the
    smallest kept activation per batch."""

    name = "batchtopk"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.use_threshold = False  # True at inference (``inference()``)

    def inference(self):
        self.use_threshold = True
        return super().inference()

    def encode(self, x, k=None, *, training=False, comm=None):
        if self.use_threshold and not training:
            pre = self.pre(x)
            return Codes(self.n, x.shape[0], self.d_sae, acts=pre * (pre > self.threshold.view(self.n, 1, 1)), vals=pre)
        return super().encode(x, k, training=training, comm=comm)

    def _select(self, pre, score, ks, comm=None):
        """The k·B largest positive scores per member (with ``comm``: of the global batch, so
        data-parallel selects what one process would)."""
        n, B, S = score.shape
        dev = score.device
        lats, vals, counts = [], [], []
        world = comm.world if comm is not None else 1
        for m in range(n):  # one topk per member over its flattened batch (n is small)
            want = ks[m] * B * world  # k per token of the global batch
            top = self._batch_top(score[m], want) if world == 1 else None
            if top is None:
                with dense_threads():
                    top = score[m].reshape(-1).topk(min(want, B * S), sorted=False)
            keep = top.values > 0
            if world > 1:  # the global want-th largest score: every rank's local candidates hold it
                cand = torch.full((want,), -math.inf, dtype=top.values.dtype, device=dev)
                cand[: len(top.values)] = top.values
                everyone = comm.gather_rows(cand)
                keep &= top.values >= everyone.topk(want, sorted=False).values.min()
            with _one_thread():
                idx = top.indices[keep].sort().values  # row-major: sorted by token
                rows = idx // S
                lats.append(idx - rows * S)
                vals.append(pre[m].reshape(-1)[idx])
                counts.append(torch.bincount(rows, minlength=B))
        return Pattern.from_counts(n, B, S, torch.cat(counts), torch.cat(lats)), torch.cat(vals)

    CANDIDATES = 4  # per token, CANDIDATES x k of its largest scores are candidates for the batch's top k·B

    def _batch_top(self, score: torch.Tensor, want: int):
        """The ``want`` largest of ``score`` [B, S] as (values, flat indices), from each row's
        CANDIDATES·k largest: one row-wise top-k of that size and a top-k over the B·c candidates instead
        of a top-k over all B·S scores (several times faster). Exact whenever no row has all its
        candidates in the selection (a row might then have more outside them): else None, and the caller
        takes the full top-k."""
        B, S = score.shape
        c = min(S, self.CANDIDATES * max(1, want // B))
        if c >= S or want >= B * c:
            return None
        with dense_threads():
            rows = score.topk(c, dim=-1, sorted=False)
            top = rows.values.reshape(-1).topk(want, sorted=False)
        if bool((rows.values.min(-1).values >= top.values.min()).any()):
            return None
        with _one_thread():
            flat = rows.indices.reshape(-1)[top.indices] + (top.indices // c) * S
        return torch.return_types.topk((top.values, flat))

    @torch.no_grad()
    def after_step(self, codes, comm, steps, total):
        """The inference threshold: moving average (window ~10% of the steps) of the smallest kept
        activation per batch."""
        kept = codes.vals.detach().masked_fill(codes.vals.detach() <= 0, float("inf"))
        mins = torch.stack(
            [kept[s].min() if s.stop > s.start else kept.new_tensor(float("inf")) for s in codes.pat.member_slices()]
        )
        if comm.active:
            mins = -comm.max_(-mins)
        mins = torch.where(torch.isfinite(mins), mins, self.threshold)
        self.threshold += (mins - self.threshold) * max(1 / steps, min(1.0, 10 / total))

    def _member_threshold(self, m):
        return {"threshold": self.threshold[m].expand(self.d_sae)}

    @torch.no_grad()
    def load_member(self, m, state):
        super().load_member(m, state)
        self.threshold[m] = state["threshold"].reshape(-1)[0]

    @classmethod
    def saelens_export(cls, options):  # what it is at inference
        return SAELensFormat("jumprelu")

    @classmethod
    def saelens_import(cls, scfg, weights, where):
        return JumpReLU.saelens_import(scfg, weights, where)
