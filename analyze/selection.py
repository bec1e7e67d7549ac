"""``--features`` specs: ``0-99``, ``3,5,10-20`` or ``all``, checked against an analysis's size."""

from __future__ import annotations

import re

from saelake.lake import UserError

MAX_FEATURES = 100_000


def parse_features(spec: str, n: int, limit: int = MAX_FEATURES) -> list[int]:
    """'0-99', '3,5,10-20' or 'all' -> sorted unique indices, each in 0..n-1."""
    spec = (spec or "").strip()
    if spec == "all":
        return list(range(n))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d{1,9})(?:-(\d{1,9}))?", part)
        if not m:
            raise UserError(f"--features takes ranges like 0-99 or 1,5,10-20 (or all), got {spec[:80]!r}")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise UserError(f"--features range {part!r} runs backwards")
        if b >= n:
            raise UserError(f"--features {part!r} is out of range: the analysis has features 0..{n - 1}")
        if b - a + 1 + len(out) > limit:
            raise UserError(f"--features selects more than {limit} features: take fewer")
        out.update(range(a, b + 1))
    if not out:
        raise UserError("--features selects nothing")
    return sorted(out)
