"""``LiveSource``: the reader interface served by running the model (no cache)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .corpus import documents, pack_contexts
from .errors import UserError
from .models import LoadedModel, load_model
from .readers import ContextBatch, TokenBatch


class LiveSource:
    """Runs ``model`` over ``corpus`` and serves the same batches as ``SnapshotSource``.

    1d batches come from a shuffle buffer of ``shuffle_buffer`` tokens (BOS positions
    dropped), permuted with a generator seeded by ``(seed, chunk)``; resuming at ``start``
    re-tokenizes but only runs the model from the chunk that holds ``start``.
    """

    def __init__(
        self,
        model: str | LoadedModel,
        corpus: str = "builtin",
        hooks: Sequence[str] = (),
        context_size: int = 128,
        *,
        text_column: str = "text",
        batch_size: int = 16,
        shuffle_buffer: int = 32768,
        dtype: str = "float32",
        device: str = "cpu",
    ):
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device)
        self.hooks = list(hooks)
        if not self.hooks:
            raise UserError("LiveSource needs at least one hook")
        self.model.check_hooks(self.hooks)
        if context_size > self.model.n_ctx:
            raise UserError(f"context size {context_size} is larger than the model's {self.model.n_ctx}")
        self.d_model = self.model.hook_dims(self.hooks)
        self.corpus, self.text_column, self.context_size = corpus, text_column, context_size
        self.forward_batch, self.shuffle_buffer, self.device = batch_size, shuffle_buffer, device
        self.dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        self._pos: dict = {}

    def _contexts(self, start: int = 0):
        ctxs = pack_contexts(
            documents(self.corpus, self.text_column), self.model.tokenizer, self.context_size, self.model.bos_token_id
        )
        return itertools.islice(ctxs, start, None)

    def _forward(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        outs = [
            self.model.activations(tokens[i : i + self.forward_batch].to(self.device), hooks)
            for i in range(0, len(tokens), self.forward_batch)
        ]
        return {h: torch.cat([o[h] for o in outs]).to("cpu", self.dtype) for h in hooks}

    def token_batches(
        self,
        batch_size: int,
        hooks: Sequence[str] | None = None,
        *,
        seed: int = 0,
        start: int = 0,
        repeat: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[TokenBatch]:
        """``shard=(rank, world)``: this rank's micro-batch of each global batch, as SnapshotSource.
        Live, every rank runs the model over the whole stream (it has no cache to split)."""
        rank, world = shard
        for i, batch in enumerate(self._token_stream(batch_size, hooks, seed, start)):
            if i % world == rank:
                yield batch

    def _token_stream(
        self, batch_size: int, hooks: Sequence[str] | None, seed: int, start: int
    ) -> Iterator[TokenBatch]:
        hooks = list(hooks or self.hooks)
        self._pos = {"kind": "tokens", "rows": start, "seed": seed}
        per_chunk = max(1, self.shuffle_buffer // self.context_size)
        bos, T = self.model.bos_token_id, self.context_size
        contexts, chunk_no, seen = self._contexts(), 0, 0
        carry = None
        while True:
            chunk = list(itertools.islice(contexts, per_chunk))
            if not chunk:
                break
            tokens = torch.from_numpy(np.stack([c.tokens for c in chunk]))
            keep = (tokens.reshape(-1) != bos).nonzero().squeeze(1)
            rows = keep[torch.from_numpy(np.random.default_rng([seed, chunk_no]).permutation(len(keep)))]
            chunk_no += 1
            if seen + len(rows) <= start:  # before the resume point: no model run needed
                seen += len(rows)
                continue
            skip, seen = max(0, start - seen), seen + len(rows)
            rows = rows[skip:]
            acts = self._forward(tokens, hooks)
            part = TokenBatch(
                acts={h: acts[h].reshape(-1, acts[h].shape[-1])[rows] for h in hooks},
                token_id=tokens.reshape(-1)[rows],
                context_id=torch.tensor([c.context_id for c in chunk])[rows // T],
                position=(rows % T).to(torch.int32),
            )
            if carry is not None:
                part = _cat(carry, part)
            i = 0
            while len(part) - i >= batch_size:
                yield self._count(_slice(part, i, i + batch_size))
                i += batch_size
            carry = _slice(part, i, len(part)) if i < len(part) else None
        if carry is not None:
            yield self._count(carry)

    def _count(self, b):
        key = "rows" if isinstance(b, TokenBatch) else "contexts"
        self._pos[key] += len(b)
        return b

    def context_batches(
        self, batch_size: int, hooks: Sequence[str] | None = None, *, start: int = 0
    ) -> Iterator[ContextBatch]:
        hooks = list(hooks or self.hooks)
        self._pos = {"kind": "contexts", "contexts": start}
        contexts = self._contexts(start)
        while True:
            chunk = list(itertools.islice(contexts, batch_size))
            if not chunk:
                return
            tokens = torch.from_numpy(np.stack([c.tokens for c in chunk]))
            yield self._count(
                ContextBatch(
                    acts=self._forward(tokens, hooks),
                    tokens=tokens,
                    context_id=torch.tensor([c.context_id for c in chunk]),
                    doc_id=torch.tensor([c.doc_id for c in chunk]),
                )
            )

    def state(self) -> dict:
        return dict(self._pos)


def _slice(b: TokenBatch, i: int, j: int) -> TokenBatch:
    return TokenBatch({h: a[i:j] for h, a in b.acts.items()}, b.token_id[i:j], b.context_id[i:j], b.position[i:j])


def _cat(a: TokenBatch, b: TokenBatch) -> TokenBatch:
    return TokenBatch(
        {h: torch.cat([a.acts[h], b.acts[h]]) for h in a.acts},
        torch.cat([a.token_id, b.token_id]),
        torch.cat([a.context_id, b.context_id]),
        torch.cat([a.position, b.position]),
    )
