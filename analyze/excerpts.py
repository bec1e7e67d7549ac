"""Feature samples as the text an explainer or scorer reads: an excerpt around the peak, activating
tokens marked «like this», BOS and document separators left out, token strings as stored (nothing
is re-tokenized). Shared by ``explain`` and ``score`` so both read examples alike.
"""

from __future__ import annotations

import random

BEFORE, AFTER = 16, 4  # tokens of context before / after the peak
MARK_FRACTION = 0.1  # mark tokens whose activation is at least this fraction of the sample's max
OPEN, CLOSE = "«", "»"


def peak(sample: dict) -> int:
    acts = sample["acts"]
    return sample["positions"][max(range(len(acts)), key=acts.__getitem__)] if acts else -1


def span(sample: dict, skip_ids: set[int]) -> range:
    """Token positions of the excerpt: around the peak, or the start of a non-activating context."""
    toks = sample["tokens"]
    p = peak(sample)
    if p < 0:
        start = next((i for i, t in enumerate(toks) if t not in skip_ids), 0)
        return range(start, min(len(toks), start + BEFORE + AFTER + 1))
    return range(max(0, p - BEFORE), min(len(toks), p + AFTER + 1))


def marked_positions(sample: dict) -> set[int]:
    """Positions whose activation is at least MARK_FRACTION of the sample's max."""
    if not sample["acts"]:
        return set()
    top = max(sample["acts"])
    return {p for p, a in zip(sample["positions"], sample["acts"]) if a >= MARK_FRACTION * top}


def excerpt(sample: dict, skip_ids: set[int], marks: set[int] | None = None) -> str:
    """The sample's excerpt with the tokens at ``marks`` wrapped in «» (None: no marks)."""
    out = []
    for i in span(sample, skip_ids):
        if sample["tokens"][i] in skip_ids:
            continue
        s = sample["strs"][i].replace("\r", "").replace("\n", "↵")
        out.append(f"{OPEN}{s}{CLOSE}" if marks and i in marks else s)
    return "".join(out).strip()


def decoy_marks(sample: dict, skip_ids: set[int], rng: random.Random) -> set[int]:
    """As many marks as the sample's real ones, on tokens of the excerpt that do not activate."""
    real = marked_positions(sample)
    active = set(sample["positions"])
    pool = [i for i in span(sample, skip_ids) if i not in active and sample["tokens"][i] not in skip_ids]
    return set(rng.sample(pool, min(len(real), len(pool))))
