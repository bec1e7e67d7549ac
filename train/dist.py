"""torch.distributed for training: data-parallel replicas of a sweep, or a sweep's SAEs split
across ranks. Under ``torchrun`` (WORLD_SIZE > 1) the process group is gloo (CPU) or nccl (CUDA).

Data-parallel: every rank holds every SAE; global batch ``j`` of the single-process run is cut into
``world`` micro-batches of the same row stream and rank ``r`` steps on micro-batch ``j·world + r``;
gradients (and the few batch-wide sums the loss needs: kept tokens, AuxK variance) are all-reduced,
so the replicas take the single-process steps and stay identical; rank 0 writes checkpoints and SAEs.
Sweep-parallel: rank ``r`` trains SAEs ``r, r + world, ...`` over the whole stream on its own.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Comm:
    """The process group as seen by the trainer; ``world == 1``: every call is a no-op."""

    def __init__(self, device: str = "cpu"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """All-reduce (sum) the gradients of ``params`` in one flat buffer."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.active or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        i = 0
        for g in grads:
            g.copy_(flat[i : i + g.numel()].view_as(g))
            i += g.numel()

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` (same shape on all ranks) in rank order."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


class LocalComm(Comm):
    """No communication (sweep-parallel steps: each rank's SAEs are its own)."""

    def __init__(self):  # no process group
        self.world, self.rank, self.device = 1, 0, "cpu"
