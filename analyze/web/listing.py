"""The SAE page's feature list: filtered, searched, sorted and paged on the server (the browser
never gets all features), with each row's short label and scores."""

from __future__ import annotations

import math

import numpy as np

from .data import Scalars

PER_PAGE = 50
SORTS = ("feature", "density", "max_act", "mean_act", "detection", "fuzzing")
SCORES = ("detection", "fuzzing")
MAX_QUERY = 200  # characters of a search


def score_arrays(sc: Scalars, explanations: dict[int, dict]) -> dict[str, np.ndarray]:
    """Detection and fuzzing scores aligned with ``sc.feature`` (NaN: not scored)."""
    out = {k: np.full(len(sc), np.nan) for k in SCORES}
    if explanations:
        feats = np.fromiter(explanations, dtype=np.int64)
        pos = np.searchsorted(sc.feature, feats)
        ok = (pos < len(sc)) & (sc.feature[np.minimum(pos, len(sc) - 1)] == feats)
        for k in SCORES:
            vals = np.array([explanations[int(f)].get(k) for f in feats], dtype=float)  # None -> nan
            out[k][pos[ok]] = vals[ok]
    return out


def _float(query: dict, key: str, errors: list[str]) -> float | None:
    v = (query.get(key) or "").strip()
    if not v:
        return None
    try:
        f = float(v)
        if not math.isfinite(f):
            raise ValueError
        return f
    except ValueError:
        errors.append(f"{key}: {v[:40]!r} is not a number (ignored)")
        return None


def feature_listing(
    sc: Scalars,
    query: dict,
    max_per: int | None = 500,
    matches: set[int] | None = None,
    scores: dict[str, np.ndarray] | None = None,
) -> dict:
    """One page of the feature list. ``matches``: the features a search found (None: no search);
    ``scores``: ``score_arrays`` (to sort by a score; unscored features go last either way)."""
    errors: list[str] = []
    f = {k: _float(query, k, errors) for k in ("dmin", "dmax", "amin", "amax")}
    sort = query.get("sort") or "feature"
    if sort not in SORTS:
        errors.append(f"sort: {sort[:40]!r} is not a column (ignored)")
        sort = "feature"
    desc = query.get("desc") in ("1", "on", "true")
    try:
        per = max(1 if max_per is None else 10, int(query.get("per") or PER_PAGE))
        per = per if max_per is None else min(max_per, per)
    except ValueError:
        per = PER_PAGE
    if sort in SCORES:
        idx = sc.select(f["dmin"], f["dmax"], f["amin"], f["amax"])
        vals = (scores or {}).get(sort, np.full(len(sc), np.nan))[idx]
        key = np.where(np.isnan(vals), np.inf, -vals if desc else vals)
        idx = idx[np.argsort(key, kind="stable")]
    else:
        idx = sc.select(f["dmin"], f["dmax"], f["amin"], f["amax"], sort, desc)
    if matches is not None:
        idx = idx[np.isin(sc.feature[idx], np.fromiter(matches, dtype=np.int64, count=len(matches)))]
    pages = max(1, math.ceil(len(idx) / per))
    try:
        page = max(1, min(pages, int(query.get("page") or 1)))
    except ValueError:
        page = 1
    rows = [sc.row(int(p)) for p in idx[(page - 1) * per : page * per]]
    keep = {k: query.get(k) for k in ("q", "dmin", "dmax", "amin", "amax", "sort", "desc", "per") if query.get(k)}
    return {
        "rows": rows,
        "total": len(idx),
        "all": len(sc),
        "page": page,
        "pages": pages,
        "per": per,
        "first": (page - 1) * per + 1 if rows else 0,
        "last": (page - 1) * per + len(rows),
        "errors": errors,
        "query": keep,
        "sort": sort,
        "desc": desc,
        "q": query.get("q") or "",
        **{k: query.get(k) or "" for k in ("dmin", "dmax", "amin", "amax")},
    }
