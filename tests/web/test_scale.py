"""The feature list pages, filters and histograms server-side: 200k features never reach the browser."""

from __future__ import annotations

import time

import numpy as np

from saelake.analyze.web import charts
from saelake.analyze.web.data import Scalars
from saelake.analyze.web.listing import feature_listing


def synthetic(n: int = 200_000, seed: int = 0) -> Scalars:
    rng = np.random.default_rng(seed)
    count = rng.integers(0, 5000, n)
    count[rng.random(n) < 0.05] = 0  # dead
    density = count / 1e6
    max_act = np.where(count > 0, rng.gamma(2, 3, n), 0).astype(np.float32)
    perm = rng.permutation(n)  # stores may return rows in any order
    return Scalars.from_columns(
        {
            "feature": np.arange(n)[perm],
            "count": count[perm],
            "density": density[perm],
            "max_act": max_act[perm],
            "mean_act": (max_act / 2)[perm],
        }
    )


def test_listing_pages_filters_and_sorts_200k_features_quickly():
    sc = synthetic()
    assert (sc.feature == np.arange(len(sc))).all()
    t0 = time.perf_counter()
    L = feature_listing(
        sc, {"dmin": "1e-3", "dmax": "4e-3", "amin": "2", "sort": "max_act", "desc": "1", "page": "3", "per": "100"}
    )
    took = time.perf_counter() - t0
    keep = (sc.density >= 1e-3) & (sc.density <= 4e-3) & (sc.max_act >= 2)
    assert L["total"] == int(keep.sum()) and L["all"] == 200_000 and len(L["rows"]) == 100
    want = np.sort(sc.max_act[keep])[::-1][200:300]
    assert [r["max_act"] for r in L["rows"]] == want.tolist()
    assert took < 0.2, took
    # bad numbers are reported and ignored; pages clamp
    L = feature_listing(sc, {"dmin": "abc", "sort": "../x", "page": "99999999", "per": "1000000"})
    assert len(L["errors"]) == 2 and L["per"] == 500 and L["page"] == L["pages"] == 400
    edges, counts, dead = sc.density_histogram()
    assert sum(counts) + dead == 200_000 and dead == int((sc.count == 0).sum())
    svg = charts.density_histogram(edges, counts, dead)
    assert svg.count('class="bar') == len(counts) + 1 and "dead" in svg


def test_charts_handle_empty_constant_and_log_data():
    assert "no data" in charts.line_chart([], "loss")
    assert "<polyline" in charts.line_chart([(0, 1.0), (10, 1.0)], "l0", logy=True)
    svg = charts.line_chart([(i, 10 ** (i / 100)) for i in range(1000)], "loss", logy=True)
    assert svg.count(" ") < 20_000 and "log y" in svg  # down-sampled
    assert "no data" in charts.activation_histogram([], [])
