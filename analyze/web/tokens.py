"""Tokens as the pages show them: each a span shaded by its activation, nothing hidden in a blob.

- The peak token (the context's largest activation) has a dark outline and bold type: a shape,
  so it stands out from a fully shaded neighbour.
- Whitespace-only tokens show visible marks (``·`` for a space, ``↵``, ``⇥``); an empty string
  shows ``∅``; invisible characters (no-break space, zero-width, control) are spelled out
  (``\\xa0``). Byte tokens (a piece of a UTF-8 character) show as ``<0xNN>`` (analyses since this
  rule; older ones stored the replacement character ``\ufffd``) with the token id on hover.
- A context is sent as a window around its peak; "…" asks the server for the rest
  (``/api/context``), so a feature page does not carry thousands of hidden spans. A static
  export has no server: it carries every token and "…" only reveals them.
- ``peak_flags``: a peak at positions 1-5 after a BOS / document separator, or on a token whose
  residual norm is far above the hook's median (attention-sink-like tokens), is flagged.
"""

from __future__ import annotations

import re
from html import escape

from markupsafe import Markup

WINDOW_BEFORE, WINDOW_AFTER = 24, 10
EARLY = 5  # positions after a BOS that count as "early"
WHITESPACE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": ""}  # others (no-break space...) are spelled: \xa0
BYTE = re.compile(r"<0x[0-9A-F]{2}>")  # as analyze.directions.token_strings spells bytes


def clean_token(s: str) -> str:
    """A token's text with line breaks and tabs drawn (used in tables of output tokens too)."""
    s = s.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")
    return s if s else "∅"


def shown(s: str) -> tuple[str, str]:
    """(text to show, extra CSS class) of one token string."""
    if s == "":
        return "∅", " ws"
    if not s.strip():
        return "".join(WHITESPACE.get(c) or repr(c)[1:-1] for c in s), " ws"
    if BYTE.search(s) or "\ufffd" in s:
        return s, " byte"
    s = clean_token(s)
    if not s.isprintable():  # zero-width and control characters, spelled out
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s), " ws"
    return s, ""


def peak_of(sample: dict) -> int:
    """Position of the sample's largest activation (-1 if none)."""
    acts = sample["acts"]
    if not acts:
        return -1
    return sample["positions"][max(range(len(acts)), key=acts.__getitem__)]


def peak_flags(sample: dict, skip_ids: set[int], norms: list[float] | None, norm_limit: float | None) -> list[str]:
    """Why a sample's peak may be an artefact: "early" (1-5 tokens after a BOS) and/or "high-norm"."""
    p = peak_of(sample)
    if p < 0:
        return []
    out = []
    toks = sample["tokens"]
    if any(toks[j] in skip_ids for j in range(max(0, p - EARLY), p)):
        out.append("early")
    if norms is not None and norm_limit and p < len(norms) and norms[p] > norm_limit:
        out.append("high-norm")
    return out


def window(sample: dict, skip_ids: set[int]) -> tuple[int, int]:
    strs, toks = sample["strs"], sample["tokens"]
    T, p = len(strs), peak_of(sample)
    if p >= 0:
        return max(0, p - WINDOW_BEFORE), min(T, p + WINDOW_AFTER + 1)
    lo = 1 if T > 1 and toks and toks[0] in skip_ids else 0
    return lo, min(T, lo + WINDOW_BEFORE + WINDOW_AFTER)


def sample_html(sample: dict, feature_max: float, skip_ids: set[int], mode: str = "window") -> Markup:
    """One context, each token a span shaded by activation / feature max with its value on hover.

    mode: "window" (only the tokens around the peak; "…" loads the rest), "all" (every token, those
    outside the window hidden until "…" is clicked: static pages), "full" (every token, shown)."""
    strs, toks = sample["strs"], sample["tokens"]
    acts = dict(zip(sample["positions"], sample["acts"]))
    T, peak = len(strs), peak_of(sample)
    lo, hi = window(sample, skip_ids) if mode != "full" else (0, T)
    ctx = sample.get("context_id")
    more = f'<span class="more" data-context="{ctx}" title="show the whole context" role="button">…</span>'
    out = [more] if lo > 0 else []
    for i in range(T) if mode == "all" else range(lo, hi):
        s = strs[i]
        text, extra = shown(s)
        cls = "t" + extra + ("" if lo <= i < hi else " far") + (" bos" if toks[i] in skip_ids else "")
        hover = f"{escape(repr(s))} · id {toks[i]}"
        a = acts.get(i)
        if a is None:
            out.append(f'<span class="{cls}" data-i="{i}" title="{hover} · 0">{escape(text)}</span>')
            continue
        alpha = min(1.0, a / feature_max) if feature_max > 0 else 1.0
        if i == peak:
            cls += " peak"
        out.append(
            f'<span class="{cls} on" data-i="{i}" data-act="{a:.6g}" '
            f'style="background-color:rgba(255,102,0,{alpha:.3f})" title="{hover} · {a:.4g}">'
            f"{escape(text)}</span>"
        )
    if hi < T:
        out.append(more)
    return Markup("".join(out))
