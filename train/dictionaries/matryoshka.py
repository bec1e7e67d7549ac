"""Matryoshka BatchTopK: nested dictionaries whose prefixes must each reconstruct the input.

The latents are ordered: for prefix sizes P1 < P2 < ... < d_sae, the first P_i latents alone are a
dictionary. Selection is BatchTopK's (the k·B largest pre-activations of the batch, over all latents),
and the training loss sums the reconstruction error of every prefix (the full dictionary included):

    loss = Σ_i ||y - (b_dec + Σ_{latent < P_i} f·W_dec)||² / N  (+ AuxK, as BatchTopK)

so early latents learn general directions and later ones refine them. The prefix reconstructions
are cumulative: each band [P_{i-1}, P_i) of the selected (token, latent) pairs is decoded once with
the sparse kernel (``train/kernels.py``) and added to the previous prefix. At inference it is a
BatchTopK (one threshold per member): any prefix of its latents is usable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelake.lake import UserError

from ..kernels import Codes, Pattern, _one_thread, _SparseDecode, _SqErr
from . import register
from .base import option
from .topk import BatchTopK, TopKOptions


@dataclass
class MatryoshkaOptions(TopKOptions):
    prefixes: list[int] | None = option(
        None, "Nested prefix sizes P1 < P2 < ... (the full dictionary is the last prefix)", "d_sae/16, d_sae/4"
    )

    def resolve(self, d_in, d_sae, where):
        super().resolve(d_in, d_sae, where)
        if self.prefixes is None:
            self.prefixes = sorted({p for p in (d_sae // 16, d_sae // 4) if 0 < p < d_sae})
        prefixes = [int(p) for p in self.prefixes]
        if prefixes and prefixes[-1] == d_sae:
            prefixes = prefixes[:-1]  # the full dictionary is always the last prefix
        if any(p <= 0 or p >= d_sae for p in prefixes) or prefixes != sorted(set(prefixes)):
            raise UserError(
                f"{where}: prefixes must increase strictly, each in 1..d_sae-1 ({d_sae - 1}), got {self.prefixes}"
            )
        self.prefixes = prefixes


@register
class Matryoshka(BatchTopK):
    name = "matryoshka"
    Options = MatryoshkaOptions

    def extra_loss(self, codes: Codes, y: torch.Tensor, N: int) -> torch.Tensor | None:
        """Σ over the proper prefixes of their squared error / N, per member [n] (the full dictionary's
        term is the trainer's reconstruction loss)."""
        prefixes = self.options[0].prefixes
        if not prefixes:
            return None
        n, B, S = codes.n, codes.B, codes.d_sae
        total, recon, lo = None, self.b_dec.unsqueeze(1), 0
        for hi in prefixes:
            with _one_thread():
                band = (codes.lat >= lo) & (codes.lat < hi)
                counts = torch.bincount(codes.bag[band], minlength=n * B)
            pat = Pattern.from_counts(n, B, S, counts, codes.lat[band])
            recon = recon + _SparseDecode.apply(codes.vals[band], self.W_dec, None, pat)
            err = _SqErr.apply(recon.float(), y).sum(-1) / N
            total = err if total is None else total + err
            lo = hi
        return total
