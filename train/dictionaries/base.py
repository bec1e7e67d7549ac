"""What a dictionary kind is: the protocol every kind implements, and its typed options.

A kind is a subclass of ``Dictionary`` (an ``nn.Module`` holding ``n`` stacked members of one shape:
parameters carry a leading member dimension so that a sweep steps same-shape members with batched
matmuls) that registers itself with ``@register`` (``train/dictionaries/__init__.py``). It owns:

- its config keys: ``Options``, a dataclass whose fields are the kind's keys (typed, defaults and
  help in one place); ``stackable`` names the keys that may differ between stacked members;
- its parameters and their initialisation (``__init__``, ``initialize``);
- its shape: which hook activations it reads (``read``) and which it writes (``written``);
- encode (pre-activations -> codes, its activation function included) and decode;
- its default learning rate (``lr_base``, scaled by 1/sqrt(d_sae/2^14));
- its losses: a sparsity penalty with its coefficient schedule (``schedule``, ``penalty``), any
  auxiliary loss (``aux_loss``) and further reconstruction terms (``extra_loss``), plus estimates
  updated after each step (``after_step``);
- its files: one member's tensors (``member_state`` / ``load_member``, SAELens orientation), the
  extra tensors a checkpoint keeps (``member_buffers``), how dataset normalization folds into its
  weights (``fold``), and its SAELens mapping (``saelens_export`` / ``saelens_import``).

Everything else (the trainer, sweeps, store, interop, eval, analysis, live inference) talks to
kinds through this class only and never compares kind names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from saelake.lake import UserError

from ..kernels import Codes


def option(default: Any = None, help: str = "", shown: str | None = None) -> Any:
    """A kind's config key: its default (None: computed from the shape, say how in ``shown``) and
    its help line, which ``lake train --help`` prints with the default."""
    return dataclasses.field(default=default, metadata={"help": help, "shown": shown})


def option_help(f: dataclasses.Field) -> str:
    """A key's help line with its default (none shown for an unset key or a flag that is off)."""
    shown = f.metadata.get("shown") or (None if f.default is None or f.default is False else str(f.default))
    return f.metadata.get("help", "") + (f" (default {shown})" if shown else "")


@dataclass
class Options:
    """Base of a kind's options. ``resolve`` fills the defaults that depend on the shape and checks
    values; ``where`` names the SAE in messages."""

    def resolve(self, d_in: int, d_sae: int, where: str) -> None:
        pass

    def latents(self) -> int | None:
        """The d_sae these options imply (e.g. Lorsa's heads), or None: from expansion / d_sae."""
        return None


def fraction(value: float, key: str, where: str) -> None:
    if not 0 <= value <= 1:
        raise UserError(f"{where}: {key} is a fraction of the steps (0..1), got {value}")


@dataclass(frozen=True)
class SAELensFormat:
    """How a kind reads in SAELens' ``cfg.json``: ``architecture``, and ``activation_fn_str`` with
    its kwargs; ``fields`` are extra top-level keys (e.g. ``k``)."""

    architecture: str
    activation_fn: str = "relu"
    activation_kwargs: dict = dataclasses.field(default_factory=dict)
    fields: dict = dataclasses.field(default_factory=dict)


class Dictionary(nn.Module):
    """``n`` stacked members of one kind and shape: ``d_in`` inputs, ``d_sae`` latents, ``d_out`` outputs."""

    name: ClassVar[str]  # the registry key (``arch`` in configs)
    Options: ClassVar[type[Options]] = Options
    stackable: ClassVar[tuple[str, ...]] = ()  # option keys that may differ between stacked members
    unit_norm_decoder: ClassVar[bool] = True  # default of ``normalize_decoder``
    saelens_imports: ClassVar[tuple[str, ...]] = ()  # SAELens architectures that import as this kind
    # True: ``encode`` takes whole contexts [b, T, d_in] (or one [T, d_in]) and the trainer feeds it the 2d
    # table (or live contexts); its codes have a row per position, context-major (Lorsa)
    context_input: ClassVar[bool] = False
    attends: ClassVar[bool] = False  # True: ``attention(x, latent)`` gives a latent's attention pattern (Lorsa)
    aux_coef: float = 0.0  # weight of ``aux_loss`` in the training loss
    # default Adam lr at d_sae = 2^14, scaled by 1/sqrt(d_sae / 2^14) (``config.default_lr``): sparsify's rule
    lr_base: ClassVar[float] = 2e-4

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        d_out: int,
        options: list[Options],
        *,
        hooks: list[str] | None = None,
        out_hooks: list[str] | None = None,
        device="cpu",
    ):
        super().__init__()
        self.d_in, self.d_sae, self.d_out, self.n = d_in, d_sae, d_out, len(options)
        self.options = options
        self.hooks = list(hooks or [])
        self.out_hooks = list(out_hooks or self.hooks)

    @classmethod
    def build(
        cls,
        d_in: int,
        d_sae: int,
        d_out: int | None = None,
        n: int = 1,
        *,
        device="cpu",
        hooks: list[str] | None = None,
        out_hooks: list[str] | None = None,
        **options,
    ) -> Dictionary:
        """A fresh dictionary (Python API, tests): option values are shared, or one per member for
        the ``stackable`` keys; None means the default. Options are resolved for this shape."""
        d_out = d_in if d_out is None else d_out
        known = {f.name for f in dataclasses.fields(cls.Options)}
        extra = {k: v for k, v in options.items() if k not in known}
        if any(v is not None for v in extra.values()):
            raise UserError(
                f"{cls.name}: unknown option(s) {', '.join(extra)}; its options: {', '.join(sorted(known))}"
            )
        members = []
        ins = list(hooks or ["input"])  # for kinds whose options depend on the hooks (widths: split evenly)
        outs = list(out_hooks or ins)
        widths = {h: d_in // len(ins) for h in ins} | {h: d_out // len(outs) for h in outs}
        for m in range(n):
            given = {
                k: (v[m] if k in cls.stackable and isinstance(v, (list, tuple)) else v)
                for k, v in options.items()
                if k in known
            }
            opts = cls.Options(**{k: v for k, v in given.items() if v is not None})
            opts.resolve(d_in, d_sae, cls.name)
            cls.resolve_shape(opts, ins, outs, widths, d_sae, cls.name)
            members.append(opts)
        return cls(d_in, d_sae, d_out, members, hooks=hooks, out_hooks=out_hooks, device=device)

    @classmethod
    def resolve_shape(
        cls,
        options: Options,
        hooks: list[str],
        out_hooks: list[str],
        widths: Mapping[str, int],
        d_sae: int,
        where: str,
        model: str | None = None,
    ) -> None:
        """Defaults and checks that depend on the hooks (``widths``: hook -> d_model) or the model (its
        spec, when known: e.g. Lorsa's rotary embedding); after ``Options.resolve``."""

    @classmethod
    def dims(cls, weights: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
        """(d_in, d_sae, d_out) of one member's saved weights (``member_state``)."""
        d_in, d_sae = weights["W_enc"].shape
        return d_in, d_sae, weights["W_dec"].shape[1]

    @property
    def device(self) -> torch.device:
        """Where the parameters are (a kind creates them on the constructor's ``device``)."""
        return next(self.parameters()).device

    # -- shape ----------------------------------------------------------------------------------
    def read(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The kind's input from hook activations (``hooks``) [..., d]: here their concatenation."""
        return torch.cat([acts[h] for h in self.hooks], -1) if len(self.hooks) > 1 else acts[self.hooks[0]]

    def target(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What the kind reconstructs (``out_hooks``), in the layout of ``decode``'s output."""
        return torch.cat([acts[h] for h in self.out_hooks], -1) if len(self.out_hooks) > 1 else acts[self.out_hooks[0]]

    def written(self, y: torch.Tensor, widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """``decode``'s output [..., d_out] split per out hook (``widths``: hook -> d_model)."""
        parts = torch.split(y, [widths[h] for h in self.out_hooks], -1)
        return dict(zip(self.out_hooks, parts))

    def encode_acts(self, acts: Mapping[str, torch.Tensor]) -> Codes:
        """Codes of every position of ``acts`` (hook -> [..., d]: tokens [N, d], contexts [b, T, d] or one
        context [T, d]); rows are the positions in order (for contexts: context-major)."""
        x = self.read(acts)
        return self.encode(x.reshape(-1, x.shape[-1]))

    def reconstruct(self, acts: Mapping[str, torch.Tensor]) -> tuple[Codes, dict[str, torch.Tensor]]:
        """(codes of every position, what the kind writes at each out hook, shaped like ``acts``) for the
        first member: the splice of ``lake eval`` and interventions (acts: at least the kind's hooks)."""
        codes = self.encode_acts(acts)
        lead = acts[self.hooks[0]].shape[:-1]
        y = self.decode(codes)[0].reshape(*lead, self.d_out)
        widths = {h: self.d_out // len(self.out_hooks) for h in self.out_hooks} | {
            h: acts[h].shape[-1] for h in self.out_hooks if h in acts
        }
        return codes, self.written(y, widths)

    # -- training -------------------------------------------------------------------------------
    def initialize(self, generators: list[torch.Generator]) -> None:
        raise NotImplementedError

    def init_from_data(self, y: torch.Tensor, how: str) -> None:
        """Data-dependent init from the first batch's targets ``y`` [B, d_out] (``b_dec_init``)."""

    def encode(self, x: torch.Tensor, k: list[int] | None = None, *, training: bool = False, comm=None) -> Codes:
        """Codes of ``x`` [B, d_in] for every member; ``k``: the scheduled sparsity (kinds with a k)."""
        raise NotImplementedError

    def decode(self, codes: Codes, bias: bool = True) -> torch.Tensor:
        """-> [n, B, d_out]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def schedule(self, step: int, total: int) -> tuple[torch.Tensor, list[int] | None]:
        """(sparsity coefficient per member [n] at ``step``, k per member or None)."""
        return torch.zeros(self.n, device=self.device), None

    def penalty(self, codes: Codes, N: int) -> torch.Tensor | None:
        """Sparsity penalty per member [n] (mean over the ``N`` tokens of the global batch), or None."""
        return None

    def aux_loss(self, x, codes: Codes, y, y_hat, dead: torch.Tensor, comm, N: int) -> torch.Tensor | None:
        """Auxiliary loss per member [n] (weighted by ``aux_coef``), or None."""
        return None

    def extra_loss(self, codes: Codes, y: torch.Tensor, N: int) -> torch.Tensor | None:
        """Further reconstruction terms per member [n], added to the loss as they are (e.g. the error of
        nested prefixes of the latents), or None."""
        return None

    def after_step(self, codes: Codes, comm, steps: int, total: int) -> None:
        """Update running estimates after an optimizer step (``steps`` steps seen so far)."""

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        raise NotImplementedError

    # -- members and files ----------------------------------------------------------------------
    def member_state(self, m: int) -> dict[str, torch.Tensor]:
        """One member's weights as saved (SAELens orientation)."""
        raise NotImplementedError

    def load_member(self, m: int, state: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def member_buffers(self, m: int) -> dict[str, torch.Tensor]:
        """Tensors besides the parameters that a checkpoint keeps for member ``m``."""
        return {}

    def load_member_buffers(self, m: int, tensors: Mapping[str, torch.Tensor]) -> None:
        pass

    @classmethod
    def fold(cls, state: dict[str, torch.Tensor], s_in: torch.Tensor, s_out: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weights trained on ``x·s_in`` (target ``y·s_out``) -> weights for raw ``x`` and ``y``."""
        raise NotImplementedError

    def inference(self) -> Dictionary:
        """Switch to inference (no gradients; a kind may change how it encodes)."""
        self.requires_grad_(False)
        return self

    def decoder_directions(self, m: int = 0) -> torch.Tensor:
        """[d_sae, d_out]: what each latent of member ``m`` writes (per unit of activation)."""
        raise NotImplementedError

    def decoder_norms(self, m: int = 0) -> torch.Tensor:
        """[d_sae, len(out_hooks)]: each latent's decoder norm into each out hook (a CLT: per output
        layer; a crosscoder across models: per model)."""
        w = self.decoder_directions(m)
        return torch.stack([p.norm(dim=-1) for p in w.split(self.d_out // len(self.out_hooks), -1)], -1)

    @classmethod
    def saelens_export(cls, options: Options) -> SAELensFormat | None:
        """This kind in SAELens' format, or None when SAELens has no format for it."""
        return None

    @classmethod
    def saelens_import(cls, scfg: dict, weights: Mapping[str, torch.Tensor], where: str) -> dict:
        """Options of this kind from a SAELens ``cfg.json`` (checking the weights it needs)."""
        return {}
