"""HTML pages (Jinja2 templates + server-side SVG charts), for the server and for static export.

``Links`` builds every URL a page shows: the server's routes, or file names of an exported
dashboard (``StaticLinks``: only pages that exist are linked; the rest is plain text).
"""
from __future__ import annotations

import math
import time
from html import escape
from importlib import resources
from urllib.parse import quote, urlencode

import jinja2
from markupsafe import Markup

from saelake.lake.heartbeat import shown_status, stalled

from . import charts
from .data import LakeData, NotFound, Scalars

CURVES = (("loss", True), ("fvu", False), ("l0", True), ("dead_fraction", False))
PER_PAGE = 50
WINDOW_BEFORE, WINDOW_AFTER = 24, 10


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


class Links:
    static = False

    def home(self) -> str | None:
        return "/"

    def run(self, name: str) -> str | None:
        return f"/run/{quote(name, safe='')}"

    def sae(self, name: str, analysis: str | None = None, **query) -> str | None:
        q = {k: v for k, v in {"analysis": analysis, **query}.items() if v not in (None, "", False)}
        return f"/sae/{quote(name, safe='')}" + (f"?{urlencode(q)}" if q else "")

    def feature(self, sae: str, index: int, analysis: str | None = None) -> str | None:
        return f"/sae/{quote(sae, safe='')}/feature/{int(index)}" + (
            f"?{urlencode({'analysis': analysis})}" if analysis else "")

    def random(self, sae: str, analysis: str | None = None) -> str | None:
        return f"/sae/{quote(sae, safe='')}/random" + (f"?{urlencode({'analysis': analysis})}" if analysis else "")

    def live(self, sae: str, analysis: str | None = None) -> str | None:
        return f"/sae/{quote(sae, safe='')}/live" + (f"?{urlencode({'analysis': analysis})}" if analysis else "")


class StaticLinks(Links):
    """Links inside an exported dashboard: index.html and feature-<i>.html files only."""
    static = True

    def __init__(self, features: set[int]):
        self.features = features

    def home(self):
        return None

    def run(self, name):
        return None

    def sae(self, name, analysis=None, **query):
        return "index.html"

    def feature(self, sae, index, analysis=None):
        return f"feature-{int(index)}.html" if int(index) in self.features else None

    def random(self, sae, analysis=None):
        return None

    def live(self, sae, analysis=None):
        return None


def clean_token(s: str) -> str:
    s = s.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")
    return s if s else "∅"


def fnum(v, digits: int = 4) -> str:
    if v is None or isinstance(v, jinja2.Undefined):  # a metric not there yet (training, or killed)
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


def pct(v) -> str:
    if v is None or isinstance(v, jinja2.Undefined):
        return "–"
    if v == 0:
        return "0%"
    return f"{100 * v:.3g}%" if v >= 1e-4 else f"{v:.2e}"


def human_bytes(n) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def sample_html(sample: dict, feature_max: float, skip_ids: set[int], window: bool = True) -> Markup:
    """One context: each token a span, shaded by activation / feature max, the value on hover."""
    strs, toks = sample["strs"], sample["tokens"]
    acts = dict(zip(sample["positions"], sample["acts"]))
    T = len(strs)
    if acts:
        peak = max(acts, key=acts.get)
        lo, hi = max(0, peak - WINDOW_BEFORE), min(T, peak + WINDOW_AFTER + 1)
    else:
        peak, lo, hi = -1, (1 if T > 1 and toks and toks[0] in skip_ids else 0), min(T, 1 + WINDOW_BEFORE + WINDOW_AFTER)
    if not window:
        lo, hi = 0, T
    out = []
    if lo > 0:
        out.append('<span class="more" title="show the whole context">…</span>')
    for i, s in enumerate(strs):
        cls = "t"
        if not lo <= i < hi:
            cls += " far"
        if toks[i] in skip_ids:
            cls += " bos"
        a = acts.get(i)
        text = escape(clean_token(s))
        if a is None:
            out.append(f'<span class="{cls}" data-i="{i}" title="{escape(repr(s))} · 0">{text}</span>')
        else:
            alpha = min(1.0, a / feature_max) if feature_max > 0 else 1.0
            if i == peak:
                cls += " peak"
            out.append(f'<span class="{cls} on" data-i="{i}" data-act="{a:.6g}" '
                       f'style="background-color:rgba(255,102,0,{alpha:.3f})" '
                       f'title="{escape(repr(s))} · {a:.4g}">{text}</span>')
    if hi < T:
        out.append('<span class="more" title="show the whole context">…</span>')
    return Markup("".join(out))


class Renderer:
    def __init__(self, data: LakeData | None, links: Links | None = None, live: bool = False):
        self.data, self.links, self.live = data, links or Links(), live
        self.env = jinja2.Environment(loader=jinja2.PackageLoader(__package__, "templates"),
                                      autoescape=True, trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(num=fnum, pct=pct, bytes=human_bytes, tok=clean_token)
        self.css, self.js = _asset("style.css"), _asset("app.js")

    def render(self, template: str, **ctx) -> str:
        t0 = time.perf_counter()
        html = self.env.get_template(template).render(links=self.links, css=Markup(self.css), js=Markup(self.js),
                                                      static=self.links.static, **ctx)
        return html.replace("@RENDER_MS@", f"{1000 * (time.perf_counter() - t0):.0f}")

    # -- pages -----------------------------------------------------------------------------------
    def lake_page(self) -> str:
        d = self.data
        runs = [{**m, "size": d.size_on_disk("runs", m["name"])} for m in d.runs()]
        snapshots = [{"run": m["name"], "n": i + 1, **v} for m in runs for i, v in enumerate(m.get("versions") or [])]
        saes = sorted((sae_row(c) for c in d.saes()), key=lambda c: c["name"])
        return self.render("lake.html", title="lake", root=d.lake.root, runs=runs, snapshots=snapshots, saes=saes,
                           analyses=d.analyses(), store=d.store_uri)

    def run_page(self, name: str) -> str:
        m = self.data.run(name)
        saes = [c for c in self.data.saes() if c.get("run") == name]
        return self.render("run.html", title=f"run {name}", m=m, size=self.data.size_on_disk("runs", name), saes=saes)

    def sae_page(self, name: str, query: dict, analysis_name: str | None = None,
                 only: list[int] | None = None) -> str:
        """``only``: list just these features, all on one page (a static export)."""
        d = self.data
        cfg = d.sae(name)
        rec = d.analysis_for(name, analysis_name)
        metrics = d.metrics(name)
        curves = []
        for metric, logy in CURVES:
            pts = [(r["tokens"], r["value"]) for r in metrics if r.get("name") == metric]
            if pts:
                curves.append(Markup(charts.line_chart(pts, metric, logy=logy, cls=f"curve-{metric}")))
        ctx = dict(title=f"SAE {name}", cfg=sae_row(cfg), rec=rec, curves=curves, analyses=d.analyses_of(name),
                   hyper=_hyper(cfg), run=None, store_error=None, listing=None, density_svg=None,
                   loading=None)
        if cfg.get("run"):
            try:
                ctx["run"] = d.run(cfg["run"])
            except NotFound:
                pass
        if rec is not None:
            from .data import Loading, StoreDown
            try:
                sc = d.scalars(rec, wait_s=None if not self.links.static else 3600)
            except StoreDown as e:
                ctx["store_error"] = str(e)
            except Loading as e:
                ctx["loading"] = str(e)
            else:
                edges, counts, dead = sc.density_histogram()
                ctx["density_svg"] = Markup(charts.density_histogram(edges, counts, dead))
                if only is not None:
                    sc = sc.subset(only)
                    query = {**query, "per": str(max(len(only), 1))}
                ctx["listing"] = feature_listing(sc, query, max_per=None if only is not None else 500)
        return self.render("sae.html", **ctx)

    def feature_page(self, sae: str, index: int, analysis_name: str | None = None, scalars: Scalars | None = None):
        d = self.data
        cfg = d.sae(sae)
        rec = d.analysis_for(sae, analysis_name)
        if rec is None:
            raise NotFound(f"SAE {sae!r} has no analysis yet (run `lake analyze {sae}`)")
        feat = d.feature(rec, index)
        skip = set(rec.get("excluded_token_ids") or [])
        fmax = float(feat["max_act"] or 0.0)
        groups = []
        samples = feat.get("samples") or []
        top = [s for s in samples if s["kind"] == "top"]
        groups.append(("top", f"top activations ({len(top)})", top))
        intervals = list((rec.get("config") or {}).get("intervals") or [])
        for j, p in enumerate(intervals):
            hi = 1.0 if j == 0 else intervals[j - 1]
            sel = [s for s in samples if s["kind"] == "interval" and s["interval"] == j]
            groups.append((f"interval-{j}", f"interval {p:g}–{hi:g} × max ({len(sel)})", sel))
        zero = [s for s in samples if s["kind"] == "zero"]
        groups.append(("zero", f"non-activating ({len(zero)})", zero))
        rendered = [(key, title, [(s, sample_html(s, fmax, skip)) for s in sel]) for key, title, sel in groups]
        hist = charts.activation_histogram(feat.get("hist_edges") or [], feat.get("hist_counts") or [])
        n = int(rec["n_features"])
        nbrs = list(zip(feat.get("neighbours") or [], feat.get("neighbour_cos") or []))
        live_ok = self.live and not self.links.static
        return self.render(
            "feature.html", title=f"feature {index} · {sae}", cfg=cfg, rec=rec, f=feat, index=index, n=n,
            groups=rendered, hist_svg=Markup(hist), neighbours=nbrs, analyses=d.analyses_of(sae),
            pos=list(zip(feat.get("pos_strs") or [], feat.get("pos_logits") or [])),
            neg=list(zip(feat.get("neg_strs") or [], feat.get("neg_logits") or [])),
            prev=index - 1 if index > 0 else None, next=index + 1 if index + 1 < n else None,
            live=live_ok, exported=sorted(self.links.features) if self.links.static else None)

    def live_page(self, sae: str, analysis_name: str | None = None) -> str:
        cfg = self.data.sae(sae)
        rec = self.data.analysis_for(sae, analysis_name)
        return self.render("live.html", title=f"live · {sae}", cfg=cfg, rec=rec, live=self.live)

    def error_page(self, status: int, message: str) -> str:
        heading = {404: "Not found", 503: "Feature store unavailable"}.get(status, "Error")
        return self.render("error.html", title=heading.lower(), status=status, heading=heading, message=message)


def sae_row(cfg: dict) -> dict:
    """An SAE's config plus what the pages show of it: its status as it stands now (training with
    progress, stalled, complete) and its held-out numbers (None: not there, shown as "–")."""
    held = cfg.get("holdout") or {}
    return {**cfg, "shown_status": shown_status(cfg), "stalled": stalled(cfg) is not None,
            "heldout_tokens": held.get("tokens_evaluated"), "heldout_fvu": held.get("fvu"),
            "heldout_l0": held.get("l0"), "heldout_dead_fraction": held.get("dead_fraction")}


def _hyper(cfg: dict) -> tuple[list[tuple[str, object]], list[tuple[str, object]]]:
    """(summary rows, all other hyper-parameters). Metrics say where they were measured."""
    held = f"held-out ({fnum(cfg.get('heldout_tokens'))} tokens)"
    keys = [("arch", "arch"), ("hook", "hook"), ("out_hook", "out_hook"), ("d_in", "d_in"), ("d_sae", "d_sae"),
            ("k", "k"), ("tokens_trained", "tokens_trained"), (f"{held} FVU", "heldout_fvu"),
            (f"{held} L0", "heldout_l0"), (f"{held} dead fraction", "heldout_dead_fraction"),
            ("train FVU (in-sample)", "fvu"), ("train L0 (in-sample)", "l0"),
            ("train dead fraction (in-sample)", "dead_fraction"), ("status", "shown_status"), ("model", "model"),
            ("created", "created")]
    always = {"heldout_fvu", "heldout_l0", "heldout_dead_fraction", "fvu", "l0", "dead_fraction"}  # "–" if missing
    main = [(label, cfg.get(k)) for label, k in keys if cfg.get(k) is not None or k in always]
    rest = []
    for k, v in (cfg.get("hyperparameters") or {}).items():
        if k not in ("hooks", "name", "out_hooks", "arch", "k", "d_sae") and v is not None:
            rest.append((k, v))
    tr = cfg.get("training") or {}
    for k in ("batch_size", "steps", "device"):
        if tr.get(k) is not None:
            rest.append((f"training.{k}", tr[k]))
    if cfg.get("normalization"):
        rest.append(("normalization", (cfg["normalization"] or {}).get("method")))
    return main, rest


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


def feature_listing(sc: Scalars, query: dict, max_per: int | None = 500) -> dict:
    """One page of the filtered, sorted feature list (server-side: the browser never gets them all)."""
    errors: list[str] = []
    f = {k: _float(query, k, errors) for k in ("dmin", "dmax", "amin", "amax")}
    sort = query.get("sort") or "feature"
    if sort not in ("feature", "density", "max_act", "mean_act"):
        errors.append(f"sort: {sort[:40]!r} is not a column (ignored)")
        sort = "feature"
    desc = query.get("desc") in ("1", "on", "true")
    try:
        per = max(1 if max_per is None else 10, int(query.get("per") or PER_PAGE))
        per = per if max_per is None else min(max_per, per)
    except ValueError:
        per = PER_PAGE
    idx = sc.select(f["dmin"], f["dmax"], f["amin"], f["amax"], sort, desc)
    pages = max(1, math.ceil(len(idx) / per))
    try:
        page = max(1, min(pages, int(query.get("page") or 1)))
    except ValueError:
        page = 1
    rows = [sc.row(int(p)) for p in idx[(page - 1) * per: page * per]]
    keep = {k: query.get(k) for k in ("dmin", "dmax", "amin", "amax", "sort", "desc", "per") if query.get(k)}
    return {"rows": rows, "total": len(idx), "all": len(sc), "page": page, "pages": pages, "per": per,
            "first": (page - 1) * per + 1 if rows else 0, "last": (page - 1) * per + len(rows), "errors": errors,
            "query": keep, "sort": sort, "desc": desc, **{k: query.get(k) or "" for k in ("dmin", "dmax", "amin", "amax")}}
