"""Interventions: splice a dictionary into the model, edit its features, generate.

    from saelake.analyze import Edit, Splice, generate
    splice = Splice(model, sae, [Edit(feature=12, mode="clamp", value=8.0)])
    logits = splice.logits(tokens)                       # one forward pass with the dictionary spliced in
    out = generate(model, prompt_ids, 20, splice)        # greedy; edits applied at every new token

The dictionary reads its input hooks (``sae.hooks``, through the kind's ``read``) and writes each
out hook (``sae.out_hooks``, through the kind's ``written``), so transcoders and multi-hook kinds
splice like SAEs. At each out hook, over the spliced positions (never BOS):

    recon  = decode(codes),  edited = decode(codes with the edits)
    error kept (default):  out = original + (edited - recon)     (no edit: exactly the original)
    error dropped:         out = edited

Edits act on the latents: ``add`` (latent += value: adds value x the feature's decoder direction),
``clamp`` (latent := value), ``ablate`` (latent := 0). A kind whose output at an out hook depends on
an input the model computes later (a crosscoder reading a later layer) cannot be spliced into one
forward pass: that is checked, not assumed. Used by ``lake eval``, ``lake steer`` and the web UI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from saelake.lake import UserError

MODES = ("add", "clamp", "ablate")


@dataclass(frozen=True)
class Edit:
    """One feature edit. ``positions``: token indices of the sequence (0 = BOS, never edited;
    negative counts from the end of the prompt); None: every spliced position, new tokens included."""

    feature: int
    mode: str = "add"
    value: float = 0.0
    positions: tuple[int, ...] | None = None

    def check(self, d_sae: int) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown edit mode {self.mode!r}: use one of {', '.join(MODES)}")
        if isinstance(self.feature, bool) or not isinstance(self.feature, int) or not 0 <= self.feature < d_sae:
            raise UserError(f"no feature {self.feature!r} in this dictionary (features 0..{d_sae - 1})")
        if not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise UserError(f"edit value must be a finite number, got {self.value!r}")


class Splice:
    """``sae`` spliced into ``model`` (a ``saelake.lake.LoadedModel``) with ``edits``.

    ``keep_error``: keep the dictionary's error term (default). ``mask`` (optional, per call of
    ``hooks``): a [batch, T] bool tensor of the positions to splice (BOS is always left out)."""

    def __init__(self, model, sae, edits: Sequence[Edit] = (), *, keep_error: bool = True):
        self.model, self.sae, self.keep_error = model, sae, keep_error
        self.edits = list(edits)
        for e in self.edits:
            e.check(sae.d_sae)
        self.reads, self.writes = list(sae.hooks), list(sae.out_hooks)
        hooks = list(dict.fromkeys(self.reads + self.writes))
        model.check_hooks(hooks)
        model.enable_hooks(hooks)
        self.widths, order = self._probe(hooks)
        # read hooks the model reaches after an out hook: the kind must not depend on them there
        self.later = {h: [r for r in self.reads if order[r] > order[h]] for h in self.writes}
        for h, later in self.later.items():
            if later:
                self._check_causal(h, later)

    def _probe(self, hooks: list[str]) -> tuple[dict[str, int], dict[str, int]]:
        """Width of each hook and the order in which the forward pass reaches them."""
        seen: dict[str, torch.Tensor] = {}
        bos = self.model.bos_token_id
        fwd = [(h, lambda t, hook, h=h: seen.setdefault(h, t)) for h in hooks]
        with torch.no_grad():
            self.model.bridge.run_with_hooks(torch.tensor([[bos, bos]]), fwd_hooks=fwd, return_type=None)
        missing = [h for h in hooks if h not in seen]
        if missing:
            raise UserError(
                f"hooks {', '.join(missing)} did not fire on {self.model.spec}: not activations of the "
                "forward pass, so the dictionary cannot be spliced there"
            )
        for h, t in seen.items():
            if t.ndim != 3:
                raise UserError(f"hook {h!r} gives {tuple(t.shape[2:])} per token: only one vector per token splices")
        widths = {h: int(seen[h].shape[-1]) for h in hooks}
        d_in = sum(widths[h] for h in self.reads)
        if d_in != self.sae.d_in:
            raise UserError(
                f"the dictionary takes inputs of size {self.sae.d_in}; {self.model.spec} gives {d_in} at "
                f"{', '.join(self.reads)}: wrong model?"
            )
        return widths, {h: i for i, h in enumerate(seen)}

    # -- the forward pass -----------------------------------------------------------------------
    def hooks(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> list[tuple[str, Callable]]:
        """TransformerBridge forward hooks for one pass over ``tokens`` [batch, T]."""
        keep = tokens != self.model.bos_token_id
        if mask is not None:
            keep = keep & mask.to(keep.device)
        edit_at = [self._positions(e, keep) for e in self.edits]
        seen: dict[str, torch.Tensor] = {}

        def on(t: torch.Tensor, hook, h: str) -> torch.Tensor | None:
            if h in self.reads:
                seen[h] = t
            if h not in self.writes:
                return None
            return self._write(h, t, seen, keep, edit_at)

        return [(h, lambda t, hook, h=h: on(t, hook, h)) for h in dict.fromkeys(self.reads + self.writes)]

    def _positions(self, edit: Edit, keep: torch.Tensor) -> torch.Tensor:
        if edit.positions is None:
            return keep
        at = torch.zeros_like(keep)
        T = keep.shape[1]
        for p in edit.positions:
            if not -T < p < T:
                raise UserError(f"edit position {p} is outside the sequence (0..{T - 1}, or negative from the end)")
            at[:, p % T] = True
        return at & keep

    def _write(self, h: str, t: torch.Tensor, seen: dict, keep: torch.Tensor, edit_at: list) -> torch.Tensor:
        if not bool(keep.any()):
            return t
        # inputs the model computes later do not change the output here (checked): zeros stand in.
        # Whole contexts go to the kind (``encode_acts``: a kind may attend across positions).
        inputs = {
            r: seen[r] if r not in self.later[h] else t.new_zeros(*t.shape[:-1], self.widths[r]) for r in self.reads
        }
        recon, edited = self._decode(inputs, keep, [a[keep] for a in edit_at], h)
        out = t.clone()
        new = t[keep].float() + (edited - recon) if self.keep_error else edited
        out[keep] = new.to(t.dtype)
        return out

    def _decode(
        self, inputs: dict, keep: torch.Tensor, edit_rows: list[torch.Tensor], h: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, edited reconstruction) at out hook ``h`` for the spliced positions."""
        codes = self.sae.encode_acts({r: v.float().to(self.sae.device) for r, v in inputs.items()})
        f = codes.dense()[0][keep.reshape(-1).to(self.sae.device)]  # [rows, d_sae]
        g = f.clone()
        for e, rows in zip(self.edits, edit_rows):
            if e.mode == "add":
                g[rows, e.feature] += e.value
            else:
                g[rows, e.feature] = e.value if e.mode == "clamp" else 0.0
        both = self.sae.decode(_dense(torch.cat([f, g]).unsqueeze(0), self.sae))[0]
        parts = self.sae.written(both, self.widths)[h].to(keep.device)
        return parts[: len(f)], parts[len(f) :]

    def _check_causal(self, h: str, later: list[str]) -> None:
        """The output at ``h`` must not depend on inputs the model computes after ``h``: compare the
        kind's output there with those inputs zero and random."""
        gen = torch.Generator().manual_seed(0)
        known = {r: torch.randn(1, 4, self.widths[r], generator=gen) for r in self.reads}
        outs = []
        for scale in (0.0, 10.0):
            codes = self.sae.encode_acts(
                {r: (v * scale if r in later else v).to(self.sae.device) for r, v in known.items()}
            )
            outs.append(self.sae.written(self.sae.decode(codes)[0], self.widths)[h])
        if not torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4):
            raise UserError(
                f"this dictionary's output at {h} depends on {', '.join(later)}, which the model computes "
                "later: it cannot be spliced into one forward pass"
            )

    # -- conveniences ---------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, T, vocab] float32 logits with the dictionary spliced in."""
        return self.model.bridge.run_with_hooks(
            tokens, fwd_hooks=self.hooks(tokens, mask), return_type="logits"
        ).float()

    @torch.no_grad()
    def activations(self, tokens: torch.Tensor, hooks: Sequence[str]) -> dict[str, torch.Tensor]:
        """Activations at ``hooks`` as the spliced model computes them (after the splice at an out hook)."""
        out: dict[str, torch.Tensor] = {}
        mine = self.hooks(tokens)
        names = dict(mine)
        fwd = []
        for h in dict.fromkeys(list(names) + list(hooks)):

            def fn(t, hook, h=h):
                t2 = names[h](t, hook) if h in names else None
                t2 = t if t2 is None else t2
                if h in hooks:
                    out[h] = t2.detach().clone()
                return t2

            fwd.append((h, fn))
        self.model.enable_hooks(list(hooks))
        self.model.bridge.run_with_hooks(tokens, fwd_hooks=fwd, return_type=None)
        return out


def _dense(acts: torch.Tensor, sae):
    from saelake.train.kernels import Codes

    n, B, S = acts.shape
    return Codes(n, B, S, acts=acts.to(sae.device))


@torch.no_grad()
def generate(
    model, prompt: Sequence[int], tokens: int, splice: Splice | None = None, *, temperature: float = 0.0, seed: int = 0
) -> list[int]:
    """``tokens`` new token ids after ``prompt`` (BOS-prefixed ids). Greedy at temperature 0
    (deterministic), else sampled with a seeded generator; ``splice`` (with its edits) applies at
    every step, to the prompt and to the tokens generated so far."""
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature must be a finite number >= 0, got {temperature}")
    check_length(model, len(prompt), tokens)
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    new: list[int] = []
    for _ in range(tokens):
        if splice is None:
            logits = model.bridge(ids, return_type="logits").float()
        else:
            logits = splice.logits(ids)
        last = logits[0, -1]
        if temperature == 0:
            nxt = int(last.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=gen))
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return new


def check_length(model, prompt_len: int, tokens: int) -> None:
    n_ctx = int(model.n_ctx or 0)
    if tokens < 0:
        raise UserError(f"the number of new tokens must be >= 0, got {tokens}")
    if n_ctx and prompt_len > n_ctx:
        raise UserError(f"the prompt is {prompt_len} tokens (BOS included); {model.spec} reads at most {n_ctx}")
    if n_ctx and prompt_len + tokens > n_ctx:
        raise UserError(
            f"the prompt ({prompt_len} tokens, BOS included) plus {tokens} new tokens exceed "
            f"{model.spec}'s context of {n_ctx}: ask for at most {n_ctx - prompt_len} tokens"
        )


@torch.no_grad()
def promoted_tokens(model, sae, feature: int, n: int = 10) -> tuple[list[int], list[float]] | None:
    """The ``n`` tokens whose logits the feature's decoder direction raises most (direct effect
    through the unembedding of what it writes into the residual stream: summed over its out hooks,
    e.g. a CLT's layers); None when its out hooks are not d_model wide."""
    from .directions import top_logits, unembedding

    W = sae.decoder_directions(0)[feature : feature + 1].float()
    widths = {h: model.d_model for h in sae.out_hooks}
    if W.shape[1] != model.d_model * len(sae.out_hooks):
        return None
    direction = sum(sae.written(W, widths).values())
    W_U, norm = unembedding(model)
    res = top_logits(direction, W_U.to(direction.device), norm, n)
    if res is None:
        return None
    ids, vals = res[0][0].tolist(), res[1][0].tolist()
    return ids, vals
