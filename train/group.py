"""A group: the SAEs of a sweep that share one kind and shape, stacked and stepped together.

Parameters carry a leading member dimension, so one batched matmul serves every member; each
member keeps its own learning rate, its kind's stackable options (k, sparsity coefficient), and
its own Adam state. What differs between kinds (activation, losses, estimates) is the kind's
(``train/dictionaries/``); the group owns the optimizer, the learning-rate schedule and the
dead-latent counters.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from .config import SAEConfig
from .dist import Comm, LocalComm
from .kernels import _SqErr, dense_threads, sparse_section


@dataclass
class StepOutput:
    """What one step of a group reports, per member: [n] tensors (``n`` the number of members), and
    ``tokens``, the tokens the loss was taken over (kept after the outlier rule, all ranks).

    Always: ``sq`` (summed squared error) and ``l0``. With the step's ``stats`` or ``window``:
    ``var`` (the batch's summed variance of the target: FVU = sq / var) and, for dictionaries with
    several out hooks, ``hook_sq`` and ``hook_var`` [n, out hooks] (FVU per out hook: a CLT's per
    output layer). With ``stats``: the rest."""

    SCHEMA_VERSION: ClassVar[int] = 1
    members: int
    tokens: int
    sq: torch.Tensor
    l0: torch.Tensor
    var: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    mse: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    lr: torch.Tensor | None = None
    l1: torch.Tensor | None = None  # the scheduled sparsity coefficient (0 for kinds without one)
    k: torch.Tensor | None = None  # the scheduled k (0 for kinds without one)
    dead_fraction: torch.Tensor | None = None
    hook_sq: torch.Tensor | None = None
    hook_var: torch.Tensor | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        for f in fields(self):
            v, per_hook = getattr(self, f.name), f.name.startswith("hook")
            if isinstance(v, torch.Tensor) and (v.shape[:1] != (self.members,) or v.ndim != 1 + per_hook):
                raise ValueError(
                    f"step output {f.name!r}: shape {tuple(v.shape)}, expected ({self.members},"
                    f"{' out hooks' if per_hook else ''})"
                )

    def fvu(self, i: int) -> float:
        return float(self.sq[i] / self.var[i].clamp_min(1e-12))


class Group:
    """Same-shape SAEs, stacked: one dictionary with ``n`` members plus their Adam state."""

    def __init__(self, cfgs: list[SAEConfig], d_model: dict[str, int], device: str):
        c = self.cfg = cfgs[0]
        self.cfgs, self.n = cfgs, len(cfgs)
        self.d_in = sum(d_model[h] for h in c.hooks)
        self.d_out = sum(d_model[h] for h in c.all_out_hooks)
        self.model = c.kind(
            self.d_in,
            c.d_sae,
            self.d_out,
            [x.options() for x in cfgs],
            apply_b_dec_to_input=c.all_out_hooks == c.hooks,
            hooks=c.hooks,
            out_hooks=c.all_out_hooks,
            device=device,
        )
        self.model.initialize([torch.Generator().manual_seed(x.seed) for x in cfgs])
        # column ranges of the output per out hook, for FVU per out hook (several out hooks only)
        edges = [0] + [d_model[h] for h in c.all_out_hooks]
        edges = [sum(edges[: i + 1]) for i in range(len(edges))]
        self.out_parts = list(zip(edges[:-1], edges[1:])) if len(c.all_out_hooks) > 1 else []
        self.lr = [x.lr for x in cfgs]
        self.params = dict(self.model.named_parameters())
        self.m = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.adam_t = 0
        self.since_fired = torch.zeros(self.n, c.d_sae, dtype=torch.long, device=device)
        self.thr_steps = 0  # steps seen by the kind's running estimates (``after_step``)
        # groups with equal keys get the same (x, y): same way of reading hooks, same hooks and input rules
        kind = type(self.model)
        self.input_key = (kind.read, kind.target, tuple(c.hooks), tuple(c.all_out_hooks), c.outlier_factor, c.normalize)

    def learning_rates(self, step: int, total: int) -> list[float]:
        """Per member at ``step``: linear warm-up over lr_warmup, linear decay to 0 over lr_decay of the steps."""
        c = self.cfg
        warm = max(1, round(c.lr_warmup * total))
        decay = round(c.lr_decay * total)
        f = min(1.0, (step + 1) / warm)
        if decay and step >= total - decay:
            f *= (total - step) / decay
        return [lr * f for lr in self.lr]

    def adam(self, lr: list[float], betas=(0.9, 0.999), eps=1e-8) -> None:
        """One fused Adam kernel per member (members have their own learning rate)."""
        self.adam_t += 1
        names = [k for k, p in self.params.items() if p.grad is not None]
        step = torch.tensor(float(self.adam_t), device=self.since_fired.device)
        with torch.no_grad():
            for i in range(self.n):

                def sl(t, i=i):
                    return t if self.n == 1 else t[i]

                torch._fused_adam_(
                    [sl(self.params[k].detach()) for k in names],
                    [sl(self.params[k].grad) for k in names],
                    [sl(self.m[k]) for k in names],
                    [sl(self.v[k]) for k in names],
                    [],
                    [step] * len(names),
                    lr=lr[i],
                    beta1=betas[0],
                    beta2=betas[1],
                    weight_decay=0.0,
                    eps=eps,
                    amsgrad=False,
                    maximize=False,
                )
        for k in names:
            self.params[k].grad = None

    # -- one step ----------------------------------------------------------------------------
    def step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        step: int,
        total: int,
        dead_window: int,
        autocast,
        stats: bool = True,
        comm: Comm | None = None,
        window: bool = False,
        rows: torch.Tensor | None = None,
    ) -> StepOutput:
        """One optimizer step of every member on ``x`` -> ``y``. ``stats``: also the metrics
        (FVU parts, L0...), else only what the loop needs every step. ``rows``: which rows of the
        output the loss counts (``y`` holds those only): kinds that read whole contexts see every
        position and are scored on the kept ones."""
        with sparse_section():
            return self._step(x, y, step, total, dead_window, autocast, stats, comm or LocalComm(), window, rows)

    def _step(self, x, y, step, total, dead_window, autocast, stats, comm, window, rows):
        c, model, n, B = self.cfg, self.model, self.n, y.shape[0]
        lr = self.learning_rates(step, total)
        coef, k = model.schedule(step, total)
        # data-parallel: the loss is a mean over the tokens of the global batch (all ranks)
        N = int(comm.sum_(torch.tensor([B], dtype=torch.long))[0]) if comm.active else B
        with autocast:
            codes = model.encode(x, k, training=True, comm=comm)
            y_hat = model.decode(codes)
        if rows is not None:
            y_hat = y_hat[:, rows]
        sq = _SqErr.apply(y_hat.float(), y)  # [n, B]
        mse = sq.sum(-1) / N
        loss = mse.sum()
        penalty = model.penalty(codes, N)
        if penalty is not None:
            loss = loss + (coef * penalty).sum()
        dead = self.since_fired >= dead_window
        aux = model.aux_loss(x, codes, y, y_hat, dead, comm, N)
        if aux is not None:
            loss = loss + model.aux_coef * aux.sum()
        extra = model.extra_loss(codes, y, N)
        if extra is not None:
            loss = loss + extra.sum()
        codes.pre = None  # free the pre-activations before the backward
        if codes.acts is not None:  # dense codes: the backward is [B, d_sae] GEMMs, worth every thread
            with dense_threads():
                loss.backward()
        else:
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
            self.thr_steps += 1
            model.after_step(codes, comm, self.thr_steps, total)
            sq_sum, l0 = sq.detach().sum(-1), codes.l0()
            if comm.active:  # batch-wide metrics: sums over the ranks
                sq_sum = comm.sum_(sq_sum.double()).float()
                l0 = (comm.sum_(l0.double() * B) / N).float()
            out = {}
            if stats or window:
                if comm.active:
                    yd = y.double()
                    s = comm.sum_(torch.cat([yd.sum(0), (yd * yd).sum().view(1)]))
                    denom = (s[-1] - s[:-1].pow(2).sum() / N).float()
                else:
                    denom = (y - y.mean(0)).pow(2).sum()
                out["var"] = denom.expand(n)
                if self.out_parts:
                    out |= self._hook_fvu_parts(y, y_hat.detach(), comm, N)
            if stats:
                zeros = torch.zeros(n, device=x.device)
                penalty = zeros if penalty is None else penalty.detach()
                aux = zeros if aux is None else aux.detach()
                extra = zeros if extra is None else extra.detach()
                out |= {
                    "loss": mse.detach() + coef * penalty + model.aux_coef * aux + extra,
                    "mse": mse.detach(),
                    "aux_loss": aux,
                    "lr": torch.tensor(lr),
                    "l1": coef,
                    "k": torch.tensor(k or [0] * n, dtype=torch.float32),
                    "dead_fraction": dead.float().mean(-1),
                }
            return StepOutput(n, N, sq_sum, l0, **out)

    def _hook_fvu_parts(self, y, y_hat, comm, N) -> dict[str, torch.Tensor]:
        """Squared error and target variance per out hook [n, P] (over all ranks)."""
        err = (y_hat.float() - y).pow(2)
        sq = torch.stack([err[..., a:b].sum((-1, -2)) for a, b in self.out_parts], -1)
        if comm.active:
            yd = y.double()
            s = comm.sum_(torch.cat([yd.sum(0), (yd * yd).sum(0)]))
            d = y.shape[1]
            col = s[d:] - s[:d].pow(2) / N
            var = torch.stack([col[a:b].sum() for a, b in self.out_parts]).float()
            sq = comm.sum_(sq.double()).float()
        else:
            yc = (y - y.mean(0)).pow(2)
            var = torch.stack([yc[:, a:b].sum() for a, b in self.out_parts])
        return {"hook_sq": sq, "hook_var": var.expand(self.n, -1)}

    # -- state ---------------------------------------------------------------------------------
    def member_tensors(self, i: int) -> dict[str, torch.Tensor]:
        out = {f"param.{k}": p.detach()[i] for k, p in self.params.items()}
        out |= {f"adam.m.{k}": t[i] for k, t in self.m.items()} | {f"adam.v.{k}": t[i] for k, t in self.v.items()}
        out |= self.model.member_buffers(i) | {"since_fired": self.since_fired[i]}
        return out

    def load_member_tensors(self, i: int, t: dict[str, torch.Tensor]) -> None:
        def get(key):
            if key not in t and key.endswith(".W_enc_t"):  # a checkpoint from before W_enc was stored transposed
                return t[key[: -len("_t")]].transpose(-1, -2)
            return t[key]

        with torch.no_grad():
            for k, p in self.params.items():
                p[i] = get(f"param.{k}")
                self.m[k][i], self.v[k][i] = get(f"adam.m.{k}"), get(f"adam.v.{k}")
            self.model.load_member_buffers(i, t)
            self.since_fired[i] = t["since_fired"]
