"""``lake feature``: one feature's statistics and samples in the terminal (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from saelake.lake.records import AnalysisRecord

BARS = " ▁▂▃▄▅▆▇█"


def sparkline(counts: list[int]) -> str:
    top = max(counts or [0])
    return "".join(BARS[0 if c == 0 else max(1, round(8 * c / top))] for c in counts) if top else ""


def _clean(s: str) -> str:
    return s.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")


def sample_text(sample: dict, feature_max: float, window: int, plain: bool) -> Text:
    """Tokens around the sample's strongest activation; activating tokens on a background whose
    strength follows act / feature max (plain output: activating tokens in «»)."""
    strs, acts = sample["strs"], dict(zip(sample["positions"], sample["acts"]))
    centre = max(acts, key=acts.get) if acts else len(strs) // 2
    lo, hi = max(0, centre - window), min(len(strs), centre + window // 2 + 1)
    text = Text("…" if lo > 0 else "")
    for i in range(lo, hi):
        tok = _clean(strs[i])
        a = acts.get(i)
        if a is None:
            text.append(tok)
        elif plain:
            text.append(f"«{tok}»")
        else:
            level = int(40 + 215 * min(1.0, a / feature_max)) if feature_max > 0 else 255
            text.append(tok, style=f"bold black on rgb(255,{255 - level + 40},{255 - level + 40})")
    if hi < len(strs):
        text.append("…")
    return text


def show_feature(
    rec: AnalysisRecord,
    feat: dict,
    n_top: int = 10,
    window: int = 12,
    console: Console | None = None,
    explanation: dict | None = None,
    labels: dict[int, str] | None = None,
) -> None:
    """``explanation``: the feature's explanation row (explanation, note, scores); ``labels``: short
    labels of its neighbours."""
    con = console or Console(highlight=False, soft_wrap=True)
    plain = not con.is_terminal
    f = feat["feature"]
    con.print(
        Text(
            f"feature {f} of {rec.sae}  (analysis {rec.name}, {rec.source} "
            f"{rec.run or rec.dataset or ''}, {rec.tokens} valid tokens)",
            style="bold",
        )
    )
    e = explanation or {}
    if e.get("explanation"):
        con.print(
            f"  explanation  {e['explanation']}  ({e.get('explainer')}"
            + (f", {e['explainer_model']}" if e.get("explainer_model") else "")
            + ")"
        )
    if e.get("detection") is not None or e.get("fuzzing") is not None:
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        con.print(f"  scores       detection {fmt(e.get('detection'))}  fuzzing {fmt(e.get('fuzzing'))}")
    if e.get("note"):
        con.print(f"  note         {e['note']}")
    con.print(
        f"  density {feat['density']:.4%}  ({feat['count']} tokens)   max {feat['max_act']:.4g}   "
        f"mean non-zero {feat['mean_act']:.4g}"
    )
    if feat["hist_counts"]:
        e = feat["hist_edges"]
        con.print(f"  histogram  {e[0]:.3g} {sparkline(feat['hist_counts'])} {e[-1]:.3g}")
    for side, label in (("pos", "promotes"), ("neg", "suppresses")):
        if feat[f"{side}_tokens"]:
            toks = ", ".join(
                f"{_clean(s)!r} {v:+.3g}" for s, v in zip(feat[f"{side}_strs"][:8], feat[f"{side}_logits"])
            )
            con.print(f"  {label:10s} {toks}")
    norms = feat.get("decoder_norms") or []
    if norms and rec.out_hooks:  # several out hooks: a CLT's output layers, a crosscoder's models
        total = sum(norms) or 1.0
        con.print("  decoder norm " + ", ".join(f"{h} {v:.3g} ({v / total:.0%})" for h, v in zip(rec.out_hooks, norms)))
    if feat["neighbours"]:
        pairs = list(zip(feat["neighbours"][:8], feat["neighbour_cos"]))
        if labels:
            con.print("  neighbours")
            for i, c in pairs:
                con.print(f"    {i:>6} cos {c:.2f}  {labels.get(i, '')}")
        else:
            con.print("  neighbours " + ", ".join(f"{i} ({c:.2f})" for i, c in pairs))
    groups = [("top contexts", [s for s in feat["samples"] if s["kind"] == "top"][:n_top])]
    intervals = rec.config.get("intervals") or []
    for j, p in enumerate(intervals):
        hi = 1.0 if j == 0 else intervals[j - 1]
        groups.append(
            (
                f"interval [{p:g}, {hi:g}) x max",
                [s for s in feat["samples"] if s["kind"] == "interval" and s["interval"] == j][:3],
            )
        )
    groups.append(("non-activating", [s for s in feat["samples"] if s["kind"] == "zero"][:2]))
    for title, samples in groups:
        if not samples:
            continue
        con.print(Text(f"\n  {title}", style="bold"))
        for s in samples:
            line = Text(f"  {s['max_act']:8.3g}  ctx {s['context_id']:<6d} ")
            line.append_text(sample_text(s, feat["max_act"], window, plain))
            con.print(line)
