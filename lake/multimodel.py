"""Several models over the same tokens (checkpoints of one model, or models that share its tokenizer):
one object that looks like a ``LoadedModel`` to ingest and the live source, with hooks named
``model:hook`` (``hooknames.py``). Tokenization, BOS, the context limit and the unembedding (analysis)
are the first model's; the models must tokenize text identically, else loading fails with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import UserError
from .hooknames import parse_models


@dataclass
class MultiModel:
    spec: str
    models: dict  # name -> LoadedModel
    enabled: set = field(default_factory=set)

    @classmethod
    def load(cls, spec: str, device: str = "cpu") -> MultiModel:
        from .models import load_model

        models = {name: load_model(path, device) for name, path in parse_models(spec)}
        (first, m0), *rest = models.items()
        vocab = m0.tokenizer.get_vocab()
        for name, m in rest:
            why = (
                "a different BOS token"
                if m.bos_token_id != m0.bos_token_id
                else "different vocabularies"
                if m.tokenizer.get_vocab() != vocab
                else None
            )
            if why:
                raise UserError(
                    f"models {first} and {name} do not share a tokenizer ({why}): the models of one run "
                    "must tokenize text identically (checkpoints of one model, or models that keep its "
                    "tokenizer)"
                )
        return cls(spec, models)

    @property
    def first(self):
        return next(iter(self.models.values()))

    @property
    def bridge(self) -> MultiBridge:
        return MultiBridge(self)

    def __getattr__(self, key):  # tokenizer, bos_token_id, d_vocab...: the first model's
        if key in ("models", "spec", "enabled"):
            raise AttributeError(key)
        return getattr(self.first, key)

    @property
    def n_ctx(self) -> int:
        return min(m.n_ctx for m in self.models.values())

    def _split(self, hooks: list[str]) -> dict[str, list[str]]:
        """``model:hook`` names -> {model: [hook, ...]}."""
        out: dict[str, list[str]] = {}
        for h in hooks:
            name, sep, hook = h.partition(":")
            if not sep or name not in self.models:
                raise UserError(
                    f"hook {h!r}: name its model, one of {', '.join(self.models)} (e.g. "
                    f"{next(iter(self.models))}:{hook or h})"
                )
            out.setdefault(name, []).append(hook)
        return out

    def hook_names(self) -> list[str]:
        return [f"{n}:{h}" for n, m in self.models.items() for h in m.hook_names()]

    def check_hooks(self, hooks: list[str]) -> None:
        for name, own in self._split(hooks).items():
            self.models[name].check_hooks(own)

    def enable_hooks(self, hooks: list[str]) -> None:
        for name, own in self._split(hooks).items():
            self.models[name].enable_hooks(own)

    def hook_dims(self, hooks: list[str]) -> dict[str, int]:
        return {
            f"{n}:{h}": d for n, own in self._split(hooks).items() for h, d in self.models[n].hook_dims(own).items()
        }

    @torch.no_grad()
    def activations(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        """One forward pass per model (each up to its last requested layer): {model:hook: [batch, ctx, d]}."""
        return {
            f"{n}:{h}": t
            for n, own in self._split(hooks).items()
            for h, t in self.models[n].activations(tokens, own).items()
        }


class MultiBridge:
    """``run_with_hooks`` over every model, one after another (hooks named ``model:hook``; each model's
    fire during its own pass, so a dictionary that needs one model's activations at another's hook is
    found not spliceable); the result and every other attribute (``W_U``, ``ln_final``, ``cfg``: the
    unembedding) are the first model's."""

    def __init__(self, multi: MultiModel):
        self.multi = multi

    def run_with_hooks(self, tokens, fwd_hooks=(), **kwargs):
        per_model: dict[str, list] = {n: [] for n in self.multi.models}
        for h, fn in fwd_hooks:
            name, sep, hook = h.partition(":")
            if not sep or name not in per_model:
                raise UserError(f"hook {h!r}: name its model, one of {', '.join(per_model)}")
            per_model[name].append((hook, fn))
        out = None
        for i, (name, m) in enumerate(self.multi.models.items()):
            if i == 0 or per_model[name]:
                res = m.bridge.run_with_hooks(tokens, fwd_hooks=per_model[name], **kwargs)
                out = res if i == 0 else out
        return out

    def __getattr__(self, key):
        return getattr(self.multi.first.bridge, key)
