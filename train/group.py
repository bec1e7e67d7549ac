"""A group: the SAEs of a sweep that share one shape, stacked and stepped together.

Parameters carry a leading member dimension, so one batched matmul serves every member; each
member keeps its own k, learning rate and sparsity schedule, and its own Adam state.
"""
from __future__ import annotations

import torch

from .config import SAEConfig
from .dist import Comm, LocalComm
from .kernels import _SqErr, _Step, sparse_section
from .sae import SPARSE_ARCHS, SparseCoder


class Group:
    """Same-shape SAEs, stacked: one SparseCoder with ``n`` members plus their Adam state."""

    def __init__(self, cfgs: list[SAEConfig], d_model: dict[str, int], device: str):
        c = self.cfg = cfgs[0]
        self.cfgs, self.n = cfgs, len(cfgs)
        self.d_in = sum(d_model[h] for h in c.hooks)
        self.d_out = sum(d_model[h] for h in c.all_out_hooks)
        ks = [x.k or 0 for x in cfgs]
        self.model = SparseCoder(c.arch, self.d_in, c.d_sae, self.d_out, self.n, k=ks,
                                 apply_b_dec_to_input=c.all_out_hooks == c.hooks,
                                 decoder_norm_topk=c.decoder_norm_topk, bandwidth=c.bandwidth,
                                 init_threshold=c.init_threshold, device=device)
        self.model.initialize([torch.Generator().manual_seed(x.seed) for x in cfgs],
                              dec_norm=0.1 if c.arch == "relu" else 1.0)
        self.k_end = ks
        self.k_start = [x.k_start or x.k or 0 for x in cfgs]
        self.lr, self.l1 = [x.lr for x in cfgs], [x.l1 for x in cfgs]
        self.l1_t = torch.tensor(self.l1, dtype=torch.float32, device=device)
        self.params = dict(self.model.named_parameters())
        self.m = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.adam_t = 0
        self.since_fired = torch.zeros(self.n, c.d_sae, dtype=torch.long, device=device)
        self.thr_steps = 0
        self.input_key = (tuple(c.hooks), tuple(c.all_out_hooks), c.outlier_factor, c.normalize)

    # -- schedules (same shape for every member; values per member) --------------------------
    def schedule(self, step: int, total: int) -> tuple[list[float], float, list[int]]:
        """(lr per member, sparsity warm-up factor, k per member) at ``step``: plain Python numbers."""
        c = self.cfg
        warm = max(1, round(c.lr_warmup * total))
        decay = round(c.lr_decay * total)
        f = min(1.0, (step + 1) / warm)
        if decay and step >= total - decay:
            f *= (total - step) / decay
        sw = max(1, round(c.sparsity_warmup * total))
        anneal = round(c.k_anneal * total)
        frac = min(1.0, step / anneal) if anneal else 1.0
        k = [round(s + (e - s) * frac) for s, e in zip(self.k_start, self.k_end)]
        return [lr * f for lr in self.lr], min(1.0, (step + 1) / sw), k

    def adam(self, lr: list[float], betas=(0.9, 0.999), eps=1e-8) -> None:
        """One fused Adam kernel per member (members have their own learning rate)."""
        self.adam_t += 1
        names = [k for k, p in self.params.items() if p.grad is not None]
        step = torch.tensor(float(self.adam_t), device=self.since_fired.device)
        with torch.no_grad():
            for i in range(self.n):
                def sl(t, i=i):
                    return t if self.n == 1 else t[i]
                torch._fused_adam_([sl(self.params[k].detach()) for k in names],
                                   [sl(self.params[k].grad) for k in names], [sl(self.m[k]) for k in names],
                                   [sl(self.v[k]) for k in names], [], [step] * len(names), lr=lr[i],
                                   beta1=betas[0], beta2=betas[1], weight_decay=0.0, eps=eps, amsgrad=False,
                                   maximize=False)
        for k in names:
            self.params[k].grad = None

    # -- one step ----------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, step: int, total: int, dead_window: int,
             autocast, stats: bool = True, comm: Comm | None = None, window: bool = False) -> dict[str, torch.Tensor]:
        """One optimizer step of every member on ``x`` -> ``y``. ``stats``: also the metrics
        (FVU parts, L0...), else only what the loop needs every step."""
        with sparse_section():
            return self._step(x, y, step, total, dead_window, autocast, stats, comm or LocalComm(), window)

    def _step(self, x, y, step, total, dead_window, autocast, stats, comm, window):
        c, model, n, B = self.cfg, self.model, self.n, x.shape[0]
        lr, l1f, k = self.schedule(step, total)
        l1 = self.l1_t * l1f
        # data-parallel: the loss is a mean over the tokens of the global batch (all ranks)
        N = int(comm.sum_(torch.tensor([B], dtype=torch.long))[0]) if comm.active else B
        with autocast:
            codes = model.encode(x, k, training=True, comm=comm)
            y_hat = model.decode(codes)
        sq = _SqErr.apply(y_hat.float(), y)  # [n, B]
        mse = sq.sum(-1) / N
        loss = mse.sum()
        sparsity = torch.zeros(n, device=x.device)
        if c.arch == "relu":
            sparsity = (codes.acts * model.W_dec.norm(dim=-1).unsqueeze(1)).sum(-1).sum(-1) / N
        elif c.arch == "jumprelu":
            sparsity = _Step.apply(codes.vals, model.theta.unsqueeze(1), model.bandwidth).sum(-1).sum(-1) / N
        if c.arch in ("relu", "jumprelu"):
            loss = loss + (l1 * sparsity).sum()
        dead = self.since_fired >= dead_window
        aux = torch.zeros(n, device=x.device)
        if c.arch in SPARSE_ARCHS and c.aux_coef > 0 and bool(dead.any()):
            aux = self._aux_loss(x, codes, (y - y_hat).detach(), dead, comm, N)
            loss = loss + c.aux_coef * aux.sum()
        codes.pre = None  # free the pre-activations before the backward
        loss.backward()
        comm.sum_grads(list(self.params.values()))
        self.adam(lr)
        if c.normalize_decoder:
            model.normalize_decoder()
        with torch.no_grad():
            fired = codes.fired()
            if comm.active:
                fired = comm.max_(fired.to(torch.uint8)).bool()
            self.since_fired += N
            self.since_fired.masked_fill_(fired, 0)
            if c.arch == "batchtopk":  # inference threshold: moving average (window ~10% of the steps) of
                # the smallest kept activation per batch
                self.thr_steps += 1
                kept = codes.vals.detach().masked_fill(codes.vals.detach() <= 0, float("inf"))
                mins = torch.stack([kept[s].min() if s.stop > s.start else kept.new_tensor(float("inf"))
                                    for s in codes.pat.member_slices()])
                if comm.active:
                    mins = -comm.max_(-mins)
                mins = torch.where(torch.isfinite(mins), mins, model.threshold)
                model.threshold += (mins - model.threshold) * max(1 / self.thr_steps, min(1.0, 10 / total))
            out = {"sq": sq.detach().sum(-1), "l0": codes.l0(), "n": N}
            if comm.active:  # batch-wide metrics: sums over the ranks
                out["sq"] = comm.sum_(out["sq"].double()).float()
                out["l0"] = (comm.sum_(out["l0"].double() * B) / N).float()
            if stats or window:
                if comm.active:
                    yd = y.double()
                    s = comm.sum_(torch.cat([yd.sum(0), (yd * yd).sum().view(1)]))
                    denom = (s[-1] - s[:-1].pow(2).sum() / N).float()
                else:
                    denom = (y - y.mean(0)).pow(2).sum()
                out["var"] = denom.expand(n)
            if stats:
                out |= {"loss": mse.detach() + l1 * sparsity.detach() + c.aux_coef * aux.detach(),
                        "mse": mse.detach(), "aux_loss": aux.detach(),
                        "lr": torch.tensor(lr), "l1": l1, "k": torch.tensor(k, dtype=torch.float32),
                        "dead_fraction": dead.float().mean(-1)}
            return out

    def _aux_loss(self, x, codes, e, dead, comm, N) -> torch.Tensor:
        """AuxK: reconstruct the residual with the top ``aux_k`` dead latents (normalised MSE)."""
        model = self.model
        with torch.no_grad():
            pre = codes.pre if codes.pre.dtype == torch.float32 else codes.pre.float()
        ac = model.aux_codes(x, pre, dead, self.cfg.aux_k)
        e_hat = model.decode(ac, bias=False)
        num = _SqErr.apply(e_hat, e).sum(-1)
        if comm.active:  # the residual's variance over the global batch
            ed = e.double()
            s = comm.sum_(torch.cat([ed.sum(1), (ed * ed).sum((1, 2)).unsqueeze(1)], 1))
            den = (s[:, -1] - s[:, :-1].pow(2).sum(1) / N).float().clamp_min(1e-12)
        else:
            den = (e - e.mean(1, keepdim=True)).pow(2).sum((-1, -2)).clamp_min(1e-12)
        return torch.where(dead.any(-1), num / den, torch.zeros_like(num))

    # -- state ---------------------------------------------------------------------------------
    def member_tensors(self, i: int) -> dict[str, torch.Tensor]:
        out = {f"param.{k}": p.detach()[i] for k, p in self.params.items()}
        out |= {f"adam.m.{k}": t[i] for k, t in self.m.items()} | {f"adam.v.{k}": t[i] for k, t in self.v.items()}
        out |= {"threshold": self.model.threshold[i:i + 1], "since_fired": self.since_fired[i]}
        return out

    def load_member_tensors(self, i: int, t: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p[i] = t[f"param.{k}"]
                self.m[k][i], self.v[k][i] = t[f"adam.m.{k}"], t[f"adam.v.{k}"]
            self.model.threshold[i] = t["threshold"][0]
            self.since_fired[i] = t["since_fired"]
