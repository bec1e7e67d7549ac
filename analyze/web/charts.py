"""Server-side SVG charts (no JavaScript library, no network): line charts and histograms."""

from __future__ import annotations

import math
from html import escape

W, H = 320, 190
ML, MR, MT, MB = 48, 10, 24, 30  # margins: left, right, top, bottom


def fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    if v == 0:
        return "0"
    a = abs(v)
    if float(v).is_integer() and a < 1e6:
        return str(int(v))
    if a >= 1e5 or a < 1e-3:
        return f"{v:.1e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.3g}"


def si(v: float) -> str:
    """Compact axis label for counts: 120000 -> 120k, 2500000 -> 2.5M."""
    a = abs(v)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suf}"
    return fmt(v)


def _svg(body: list[str], title: str, cls: str, w: int = W, h: int = H) -> str:
    return (
        f'<svg class="chart {cls}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        f'<text class="ct" x="{ML}" y="15">{escape(title)}</text>' + "".join(body) + "</svg>"
    )


def _downsample(pts: list[tuple[float, float]], n: int = 400) -> list[tuple[float, float]]:
    if len(pts) <= n:
        return pts
    step = len(pts) / n
    out = [pts[int(i * step)] for i in range(n)]
    return out + [pts[-1]]


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(
    points: list[tuple[float, float]], title: str, xlabel: str = "tokens", logy: bool = False, cls: str = ""
) -> str:
    pts = [(float(x), float(y)) for x, y in points if y is not None and math.isfinite(y)]
    if logy and pts and all(y > 0 for _, y in pts):
        tr = math.log10
    else:
        logy, tr = False, (lambda v: v)
    if not pts:
        return _svg(
            [f'<text class="empty" x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text>'], title, "line " + cls
        )
    pts = sorted(pts)
    xs, ys = [p[0] for p in pts], [tr(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.1 or 1), y1 + (abs(y1) * 0.1 or 1)
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = W - ML - MR, H - MT - MB
    sx = lambda x: ML + (x - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda y: MT + ph - (y - y0) / (y1 - y0) * ph  # noqa: E731
    body = [f'<rect class="plot" x="{ML}" y="{MT}" width="{pw}" height="{ph}"/>']
    if logy:
        yt = [float(k) for k in range(math.ceil(y0), math.floor(y1) + 1)]  # powers of ten
        if len(yt) < 2:
            yt = [math.log10(v) for v in _ticks(10**y0, 10**y1, 3) if v > 0]
    else:
        yt = _ticks(y0, y1)
    for t in yt:
        label = fmt(10**t) if logy else fmt(t)
        body.append(
            f'<line class="grid" x1="{ML}" x2="{ML + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
            f'<text class="tick" x="{ML - 4}" y="{sy(t) + 3:.1f}" text-anchor="end">{label}</text>'
        )
    for t in _ticks(x0, x1, 3):
        body.append(f'<text class="tick" x="{sx(t):.1f}" y="{MT + ph + 12}" text-anchor="middle">{si(t)}</text>')
    body.append(
        f'<text class="axis" x="{ML + pw / 2}" y="{H - 3}" text-anchor="middle">{escape(xlabel)}'
        f"{' (log y)' if logy else ''}</text>"
    )
    d = " ".join(f"{sx(x):.1f},{sy(tr(y)):.1f}" for x, y in _downsample(pts))
    body.append(
        f'<polyline class="series" points="{d}"><title>{escape(title)}: last {fmt(pts[-1][1])} at '
        f"{fmt(pts[-1][0])} {escape(xlabel)}</title></polyline>"
    )
    return _svg(body, title, "line " + cls)


def bar_chart(
    labels: list[tuple[str, str]],
    counts: list[int],
    title: str,
    xlabel: str = "",
    extra: tuple[str, int] | None = None,
    cls: str = "",
    log_counts: bool = False,
) -> str:
    """Bars of equal width. ``labels[i]`` = (tick label at the bar's left edge, hover text).
    ``extra`` = (label, count): one separate grey bar on the left (e.g. dead features)."""
    n = len(counts) + (1 if extra else 0)
    if n == 0:
        return _svg(
            [f'<text class="empty" x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text>'], title, "bars " + cls
        )
    vals = ([extra[1]] if extra else []) + list(counts)
    tr = (lambda c: math.log10(1 + c)) if log_counts else float
    top = max(tr(v) for v in vals) or 1.0
    pw, ph = W - ML - MR, H - MT - MB
    bw = pw / (n + (0.5 if extra else 0))
    body = [f'<rect class="plot" x="{ML}" y="{MT}" width="{pw}" height="{ph}"/>']
    vmax = max(vals)
    for t in [0, vmax] if not log_counts else [0, vmax]:
        y = MT + ph - (tr(t) / top) * ph
        body.append(f'<text class="tick" x="{ML - 4}" y="{y + 3:.1f}" text-anchor="end">{fmt(t)}</text>')
    x = ML
    if extra:
        h = tr(extra[1]) / top * ph
        body.append(
            f'<rect class="bar dead" x="{x + 1:.1f}" y="{MT + ph - h:.1f}" width="{max(bw - 2, 1):.1f}" '
            f'height="{h:.1f}" data-count="{extra[1]}"><title>{escape(extra[0])}: {extra[1]}</title></rect>'
            f'<text class="tick" x="{x + bw / 2:.1f}" y="{MT + ph + 12}" text-anchor="middle">'
            f"{escape(extra[0])}</text>"
        )
        x += bw * 1.5
    every = max(1, math.ceil(len(counts) / 5))
    for i, (c, (tick, hover)) in enumerate(zip(counts, labels)):
        h = tr(c) / top * ph
        body.append(
            f'<rect class="bar" x="{x + i * bw:.2f}" y="{MT + ph - h:.1f}" width="{max(bw - 0.6, 0.6):.2f}" '
            f'height="{h:.1f}" data-count="{c}"><title>{escape(hover)}: {c}</title></rect>'
        )
        if i % every == 0 and tick and not (extra and i == 0):
            body.append(
                f'<text class="tick" x="{x + i * bw:.1f}" y="{MT + ph + 12}" text-anchor="middle">{escape(tick)}</text>'
            )
    if xlabel:
        body.append(f'<text class="axis" x="{ML + pw / 2}" y="{H - 3}" text-anchor="middle">{escape(xlabel)}</text>')
    return _svg(body, title, "bars " + cls)


def density_histogram(edges: list[float], counts: list[int], dead: int) -> str:
    labels = [(f"{e:g}", f"log10 density [{e:g}, {edges[i + 1]:g})") for i, e in enumerate(edges[:-1])]
    return bar_chart(
        labels,
        counts,
        f"feature density ({sum(counts) + dead} features, {dead} dead)",
        "log10 density (fraction of tokens)",
        extra=("dead", dead),
        cls="density",
    )


def activation_histogram(edges: list[float], counts: list[int]) -> str:
    labels = [(fmt(e), f"[{fmt(e)}, {fmt(edges[i + 1])})") for i, e in enumerate(edges[:-1])]
    return bar_chart(labels, counts, "activation histogram (non-zero)", "activation (log-spaced bins)", cls="acts")


ARCH_COLOURS = ("#2563eb", "#d97706", "#059669", "#9333ea", "#dc2626", "#0891b2")


def sweep_chart(points: list[dict], ylabel: str, title: str, cls: str = "") -> str:
    """One metric against L0 (log x) for the SAEs of a run and hook. ``points``: dicts with name, arch,
    l0, y, href (None: not linked), source (held-out | lake eval | in-sample: in-sample points are hollow). One
    line per arch through its points by L0; each point is a link to its SAE."""
    pts = [p for p in points if p.get("l0") and p["l0"] > 0 and p.get("y") is not None and math.isfinite(p["y"])]
    if not pts:
        return _svg(
            [f'<text class="empty" x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text>'], title, "sweep " + cls
        )
    xs, ys = [math.log10(p["l0"]) for p in pts], [p["y"] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 - x0 < 0.2:
        x0, x1 = x0 - 0.1, x1 + 0.1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.1 or 0.1), y1 + (abs(y1) * 0.1 or 0.1)
    padx, pady = (x1 - x0) * 0.06, (y1 - y0) * 0.08
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady
    pw, ph = W - ML - MR, H - MT - MB
    sx = lambda x: ML + (x - x0) / (x1 - x0) * pw
    sy = lambda y: MT + ph - (y - y0) / (y1 - y0) * ph
    body = [f'<rect class="plot" x="{ML}" y="{MT}" width="{pw}" height="{ph}"/>']
    for t in _ticks(y0, y1):
        body.append(
            f'<line class="grid" x1="{ML}" x2="{ML + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
            f'<text class="tick" x="{ML - 4}" y="{sy(t) + 3:.1f}" text-anchor="end">{fmt(t)}</text>'
        )
    xt = [float(k) for k in range(math.ceil(x0), math.floor(x1) + 1)]
    if len(xt) < 2:
        xt = [math.log10(v) for v in _ticks(10**x0, 10**x1, 3) if v > 0]
    for t in xt:
        body.append(
            f'<text class="tick" x="{sx(t):.1f}" y="{MT + ph + 12}" text-anchor="middle">{fmt(round(10**t, 6))}</text>'
        )
    body.append(
        f'<text class="axis" x="{ML + pw / 2}" y="{H - 3}" text-anchor="middle">L0 (log scale) · '
        f"{escape(ylabel)}</text>"
    )
    archs = sorted({p["arch"] or "?" for p in pts})
    for j, arch in enumerate(archs):
        colour = ARCH_COLOURS[j % len(ARCH_COLOURS)]
        mine = sorted((p for p in pts if (p["arch"] or "?") == arch), key=lambda p: p["l0"])
        if len(mine) > 1:
            d = " ".join(f"{sx(math.log10(p['l0'])):.1f},{sy(p['y']):.1f}" for p in mine)
            body.append(f'<polyline class="series" style="stroke:{colour}" points="{d}"/>')
        for p in mine:
            cx, cy = sx(math.log10(p["l0"])), sy(p["y"])
            fill = "#fff" if p.get("source") == "in-sample" else colour
            tip = f"{p['name']} ({arch}): {ylabel} {fmt(p['y'])} at L0 {fmt(p['l0'])} ({p.get('source')})"
            dot = (
                f'<circle class="pt" cx="{cx:.1f}" cy="{cy:.1f}" r="4.5" style="fill:{fill};stroke:{colour}" '
                f'data-sae="{escape(p["name"])}" data-l0="{p["l0"]:.6g}" data-y="{p["y"]:.6g}">'
                f"<title>{escape(tip)}</title></circle>"
            )
            body.append(f'<a href="{escape(p["href"])}">{dot}</a>' if p.get("href") else dot)
    legend = " ".join(
        f'<tspan style="fill:{ARCH_COLOURS[j % len(ARCH_COLOURS)]}">● {escape(a)}</tspan>' for j, a in enumerate(archs)
    )
    body.append(f'<text class="tick" x="{W - MR}" y="15" text-anchor="end">{legend}</text>')
    return _svg(body, title, "sweep " + cls)
