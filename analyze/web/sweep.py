"""The lake page's sweep view: FVU (and CE loss recovered where `lake eval` ran) against L0 for
the SAEs of each run and hook, and each SAE's dead and dense feature counts.

Numbers are the held-out ones (rows training never read) when an SAE has them, else those of
`lake eval`, else the in-sample training numbers (drawn hollow and said so on hover).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DENSE = 0.1  # a feature firing on more than this fraction of tokens is "dense"


@dataclass
class SweepGroup:
    run: str
    hook: str
    points: list[dict] = field(default_factory=list)

    @property
    def has_ce(self) -> bool:
        return any(p["ce"] is not None for p in self.points)


def sae_point(cfg: dict) -> dict | None:
    """(L0, FVU, CE loss recovered) of one SAE, or None when it has no L0/FVU yet."""
    held, ev = cfg.get("holdout") or {}, cfg.get("eval") or {}
    if held.get("l0") is not None and held.get("fvu") is not None:
        l0, fvu, source = held["l0"], held["fvu"], "held-out"
    elif ev.get("l0") is not None and ev.get("fvu") is not None:
        l0, fvu, source = ev["l0"], ev["fvu"], "lake eval"
    elif cfg.get("l0") is not None and cfg.get("fvu") is not None:
        l0, fvu, source = cfg["l0"], cfg["fvu"], "in-sample"
    else:
        return None
    return {
        "name": cfg["name"],
        "arch": cfg.get("arch"),
        "l0": float(l0),
        "fvu": float(fvu),
        "ce": ev.get("ce_loss_recovered"),
        "source": source,
    }


def sweep_groups(saes: list[dict]) -> list[SweepGroup]:
    """SAEs with metrics grouped by (run, hook); groups sorted by run then hook."""
    groups: dict[tuple[str, str], SweepGroup] = {}
    for cfg in saes:
        p = sae_point(cfg)
        if p is None:
            continue
        hook = cfg.get("hook") or "?"
        if cfg.get("out_hook") and cfg["out_hook"] != hook:
            hook = f"{hook} → {cfg['out_hook']}"
        key = (cfg.get("run") or "live", hook)
        groups.setdefault(key, SweepGroup(*key)).points.append(p)
    return [groups[k] for k in sorted(groups)]


def feature_counts(count: np.ndarray, density: np.ndarray) -> dict:
    """Dead (never fired in the analysis) and dense (density above 10%) feature counts."""
    return {"dead": int((count == 0).sum()), "dense": int((density > DENSE).sum())}
