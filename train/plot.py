"""``lake plot``: training curves of one SAE; the FVU (and CE loss recovered) vs L0 Pareto plot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from saelake.lake import UserError

from .store import SAEStore

CURVES = ("loss", "fvu", "l0", "dead_fraction", "lr", "aux_loss")


def plot_curves(lake, name: str, out: str) -> None:
    store = SAEStore(lake)
    cfg = store.config(name)
    rows = [r for r in store.metrics(name) if r["name"] in CURVES]
    if not rows:
        raise UserError(f"SAE {name!r} has no training curves (status {cfg.get('status')})")
    names = [c for c in CURVES if any(r["name"] == c for r in rows)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, metric in zip(axes[0], names):
        pts = sorted((r["tokens"], r["value"]) for r in rows if r["name"] == metric)
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(metric)
        ax.set_xlabel("tokens")
        if metric in ("loss", "l0", "aux_loss") and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
    fig.suptitle(f"{name} ({cfg['arch']}, d_sae {cfg['d_sae']}" + (f", k {cfg['k']}" if cfg.get("k") else "") + ")")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_pareto(lake, names: list[str], out: str) -> None:
    store = SAEStore(lake)
    pts = []
    for n in names:
        cfg = store.config(n)
        ev = cfg.get("eval") or {}
        l0, fvu = ev.get("l0", cfg.get("l0")), ev.get("fvu", cfg.get("fvu"))
        if l0 is None or fvu is None:
            raise UserError(f"SAE {n!r} has no final metrics (status {cfg.get('status')}): train or eval it first")
        pts.append((n, cfg["arch"], l0, fvu, ev.get("ce_loss_recovered")))
    has_ce = any(p[4] is not None for p in pts)
    fig, axes = plt.subplots(1, 2 if has_ce else 1, figsize=(10 if has_ce else 5.5, 4), squeeze=False)
    for j, (label, idx) in enumerate([("FVU (lower is better)", 3), ("CE loss recovered", 4)][: 1 + has_ce]):
        ax = axes[0][j]
        for arch in sorted({p[1] for p in pts}):
            sel = sorted((p for p in pts if p[1] == arch and p[idx] is not None), key=lambda p: p[2])
            ax.plot([p[2] for p in sel], [p[idx] for p in sel], "o-", label=arch)
            for p in sel:
                ax.annotate(p[0], (p[2], p[idx]), fontsize=7, alpha=0.7)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
