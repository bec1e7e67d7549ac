"""What a feature writes: output tokens through the unembedding, and its decoder neighbours.

Logits: the feature's decoder row ``w`` (in the hook's space) is read as if written straight
into the final residual stream: ``effect = norm_linear(w) @ W_U``. ``norm_linear`` is the
model's final norm without its data-dependent scale: for LayerNorm, centre ``w`` (subtract its
mean over d_model) then multiply by the norm's weight ``γ``; for RMSNorm, multiply by ``γ``.
The 1/σ (or 1/rms) factor is dropped: it is the same positive number for every vocabulary
entry at a position, so it does not change the ranking; the norm's bias and ``b_U`` are not
feature-specific and are dropped too. Paths through later layers are ignored (direct effect).
Decoders whose width differs from d_model (e.g. hook_post of an MLP) get no logits.

Neighbours: cosine similarity of decoder rows, the ``n`` largest excluding the feature itself.
"""

from __future__ import annotations

import re

import torch


def _final_norm(bridge) -> tuple[str, torch.Tensor | None]:
    ln = getattr(bridge, "ln_final", None)
    orig = getattr(ln, "original_component", ln)
    weight = getattr(orig, "weight", None)
    kind = str(getattr(bridge.cfg, "normalization_type", "") or "").upper()
    if not kind:
        kind = "LN" if getattr(orig, "bias", None) is not None else ("RMS" if weight is not None else "")
    return (
        "layernorm" if kind.startswith("LN") else "rmsnorm" if kind.startswith("RMS") else "none",
        None if weight is None else weight.detach().float(),
    )


def unembedding(model) -> tuple[torch.Tensor, str]:
    """(W_U [d_model, vocab] with the final norm's weight folded in, description of the norm)."""
    bridge = model.bridge
    W_U = bridge.W_U.detach().float()
    kind, gamma = _final_norm(bridge)
    if gamma is not None:
        W_U = gamma[:, None] * W_U
    return W_U, kind


@torch.no_grad()
def top_logits(W_dec: torch.Tensor, W_U: torch.Tensor, norm: str, n: int, chunk: int = 256):
    """-> (pos_ids, pos_vals, neg_ids, neg_vals), each [d_sae, n]; None when shapes differ."""
    if W_dec.shape[1] != W_U.shape[0] or n <= 0:
        return None
    n = min(n, W_U.shape[1])
    out = [[], [], [], []]
    for i in range(0, W_dec.shape[0], chunk):
        w = W_dec[i : i + chunk].float()
        if norm == "layernorm":
            w = w - w.mean(1, keepdim=True)
        logits = w @ W_U
        pos, neg = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        for lst, t in zip(out, (pos.indices, pos.values, neg.indices, neg.values)):
            lst.append(t)
    return tuple(torch.cat(t) for t in out)


@torch.no_grad()
def neighbours(W_dec: torch.Tensor, n: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids, cosines) [d_sae, n] by decoder cosine similarity, self excluded."""
    S = W_dec.shape[0]
    n = min(n, S - 1)
    Wn = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    ids, cos = [], []
    for i in range(0, S, chunk):
        sim = Wn[i : i + chunk] @ Wn.t()
        sim[torch.arange(sim.shape[0]), torch.arange(i, i + sim.shape[0])] = float("-inf")
        top = sim.topk(n, dim=1)
        ids.append(top.indices)
        cos.append(top.values)
    return torch.cat(ids), torch.cat(cos)


def vocab_strings(tokenizer, size: int) -> list[str]:
    """Display string of every token id (decoded one by one, so byte-level BPE shows as text)."""
    known = min(size, len(tokenizer))
    return token_strings(tokenizer, list(range(known))) + [f"<{i}>" for i in range(known, size)]


def _byte_level_chars() -> dict[str, int]:
    """GPT-2 byte-level BPE: the character that stands for each byte in a token's spelling."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token decoded on its own; a token that holds part of a UTF-8 character (decoding gives
    U+FFFD) is spelled by its bytes, printable ASCII as itself and the rest as ``<0xNN>``
    (`` <0xE2><0x80>``), instead of an anonymous ``�``."""
    out = tokenizer.batch_decode([[i] for i in ids])
    bad = [j for j, s in enumerate(out) if "\ufffd" in s]
    if bad:
        chars = _byte_level_chars()
        raw = tokenizer.convert_ids_to_tokens([ids[j] for j in bad])
        for j, r in zip(bad, raw):
            if r and all(c in chars for c in r):
                out[j] = "".join(chr(b) if 0x20 <= b < 0x7F else f"<0x{b:02X}>" for b in map(chars.get, r))
            elif r and re.fullmatch(r"(<0x[0-9A-Fa-f]{2}>)+", r):  # SentencePiece byte fallback
                out[j] = r.upper().replace("0X", "0x")
    return out
