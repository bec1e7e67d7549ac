"""HTML pages (Jinja2 templates + server-side SVG charts), for the server and for static export.

``Links`` builds every URL a page shows: the server's routes, or file names of an exported
dashboard (``StaticLinks``: only pages that exist are linked; the rest is plain text).
"""

from __future__ import annotations

import math
import time
from importlib import resources
from urllib.parse import quote, urlencode

import jinja2
from markupsafe import Markup, escape

from saelake.analyze.explanations import FIELDS as EXPLANATION_FIELDS
from saelake.lake.heartbeat import shown_status, stalled

from . import charts, kinds
from .data import LakeData, Loading, NotFound, StoreDown
from .listing import feature_listing, score_arrays
from .sweep import feature_counts, sweep_groups
from .tokens import peak_flags, sample_html, shown

CURVES = (("loss", True), ("fvu", False), ("l0", True), ("dead_fraction", False))
DEFAULT_OUTLIER_FACTOR = 10.0  # a peak on a token above this x the hook's median norm is flagged


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
            f"?{urlencode({'analysis': analysis})}" if analysis else ""
        )

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


class Renderer:
    def __init__(self, data: LakeData | None, links: Links | None = None, live: bool = False):
        self.data, self.links, self.live = data, links or Links(), live
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader(__package__, "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
        )
        self.env.filters.update(num=fnum, pct=pct, bytes=human_bytes, tok=lambda s: shown(s)[0], wbr=break_after_dots)
        self.css, self.js = _asset("style.css"), _asset("app.js")

    def render(self, template: str, **ctx) -> str:
        t0 = time.perf_counter()
        html = self.env.get_template(template).render(
            links=self.links, css=Markup(self.css), js=Markup(self.js), static=self.links.static, **ctx
        )
        return html.replace("@RENDER_MS@", f"{1000 * (time.perf_counter() - t0):.0f}")

    # -- pages -----------------------------------------------------------------------------------
    def lake_page(self) -> str:
        d = self.data
        runs = [{**m, "size": d.size_on_disk("runs", m["name"])} for m in d.runs()]
        snapshots = [{"run": m["name"], "n": i + 1, **v} for m in runs for i, v in enumerate(m.get("versions") or [])]
        configs = d.saes()
        saes = sorted(({**sae_row(c), **self._counts(c["name"])} for c in configs), key=lambda c: c["name"])
        sweeps = []
        for g in sweep_groups(configs):
            pts = [{**p, "href": self.links.sae(p["name"])} for p in g.points]
            charts_ = [
                Markup(charts.sweep_chart([{**p, "y": p["fvu"]} for p in pts], "FVU", "FVU vs L0", cls="sweep-fvu"))
            ]
            if g.has_ce:
                charts_.append(
                    Markup(
                        charts.sweep_chart(
                            [{**p, "y": p["ce"]} for p in pts],
                            "CE loss recovered",
                            "CE loss recovered vs L0",
                            cls="sweep-ce",
                        )
                    )
                )
            sweeps.append({"run": g.run, "hook": g.hook, "n": len(g.points), "charts": charts_})
        return self.render(
            "lake.html",
            title="lake",
            root=d.lake.root,
            runs=runs,
            snapshots=snapshots,
            saes=saes,
            analyses=d.analyses(),
            store=d.store_uri,
            sweeps=sweeps,
        )

    def _counts(self, sae: str) -> dict:
        """Dead and dense feature counts from the SAE's default analysis (None: no analysis / not loaded)."""
        recs = self.data.analyses_of(sae)
        embedded = [r for r in recs if (r.get("store") or "embedded") == "embedded"]
        rec = embedded[0] if embedded else self.data.analysis_for(sae, None)  # the lake's own is read at once
        if rec is None:
            return {"dead": None, "dense": None, "counted_in": None}
        try:
            sc = self.data.scalars(rec, wait_s=0.3 if not self.links.static else 3600)
        except (Loading, StoreDown, NotFound):
            return {"dead": None, "dense": None, "counted_in": rec["name"]}
        return {**feature_counts(sc.count, sc.density), "counted_in": rec["name"]}

    def run_page(self, name: str) -> str:
        m = self.data.run(name)
        saes = [c for c in self.data.saes() if c.get("run") == name]
        return self.render("run.html", title=f"run {name}", m=m, size=self.data.size_on_disk("runs", name), saes=saes)

    def sae_page(self, name: str, query: dict, analysis_name: str | None = None, only: list[int] | None = None) -> str:
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
        ctx = dict(
            title=f"SAE {name}",
            cfg=sae_row(cfg),
            rec=rec,
            curves=curves,
            analyses=d.analyses_of(name),
            hyper=_hyper(sae_row(cfg)),
            run=None,
            store_error=None,
            listing=None,
            density_svg=None,
            loading=None,
            labels={},
            search_note=None,
        )
        if cfg.get("run"):
            try:
                ctx["run"] = d.run(cfg["run"])
            except NotFound:
                pass
        if rec is not None:
            wait = None if not self.links.static else 3600
            try:
                sc = d.scalars(rec, wait_s=wait)
                q = (query.get("q") or "").strip()[:200]
                matches = d.search(rec, q, wait_s=wait) if q else None
                expl = d.explanations(rec)
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
                listing = feature_listing(
                    sc, query, max_per=None if only is not None else 500, matches=matches, scores=score_arrays(sc, expl)
                )
                ctx["listing"] = listing
                ctx["labels"] = d.labels(
                    rec, [r["feature"] for r in listing["rows"]], wait_s=0.5 if not self.links.static else 3600
                )
                ctx["explained"] = sum(1 for e in expl.values() if e.get("explanation"))
                ctx["scored"] = sum(1 for e in expl.values() if e.get("detection") is not None)
        return self.render("sae.html", **ctx)

    def feature_page(self, sae: str, index: int, analysis_name: str | None = None):
        d = self.data
        cfg = d.sae(sae)
        rec = d.analysis_for(sae, analysis_name)
        if rec is None:
            raise NotFound(f"SAE {sae!r} has no analysis yet (run `lake analyze {sae}`)")
        feat = d.feature(rec, index)
        skip = set(rec.get("excluded_token_ids") or [])
        fmax = float(feat["max_act"] or 0.0)
        samples = feat.get("samples") or []
        norms, median = d.context_norms(rec, [s["context_id"] for s in samples if s["acts"]])
        limit = median * float(cfg.get("outlier_factor") or DEFAULT_OUTLIER_FACTOR) if median else None
        groups = []
        top = [s for s in samples if s["kind"] == "top"]
        groups.append(("top", "top activations", _act_range(top), top))
        top_ids = {s["context_id"] for s in top}
        intervals = list((rec.get("config") or {}).get("intervals") or [])
        for j, p in enumerate(intervals):
            hi = 1.0 if j == 0 else intervals[j - 1]
            sel = [
                s for s in samples if s["kind"] == "interval" and s["interval"] == j and s["context_id"] not in top_ids
            ]  # the top group shows those already
            groups.append(
                (
                    f"interval-{j}",
                    f"activations {fnum(p * fmax, 3)}–{fnum(hi * fmax, 3)}",
                    f"{p:g}–{hi:g} × max, not in the top group",
                    sel,
                )
            )
        zero = [s for s in samples if s["kind"] == "zero"]
        groups.append(("zero", "non-activating", "", zero))
        mode = "all" if self.links.static else "window"
        rendered, n_flagged = [], 0
        for key, title, note, sel in groups:
            items = []
            for s in sel:
                flags = peak_flags(s, skip, norms.get(s["context_id"]), limit)
                n_flagged += bool(flags)
                items.append((s, sample_html(s, fmax, skip, mode), flags))
            rendered.append((key, title, note, items))
        hist = charts.activation_histogram(feat.get("hist_edges") or [], feat.get("hist_counts") or [])
        n = int(rec["n_features"])
        nbrs = list(zip(feat.get("neighbours") or [], feat.get("neighbour_cos") or []))
        live_ok = self.live and not self.links.static
        try:
            expl = dict.fromkeys(EXPLANATION_FIELDS) | (d.explanations(rec).get(index) or {})
        except StoreDown:
            expl = dict.fromkeys(EXPLANATION_FIELDS)
        attention = kinds.attention_rows(d.lake, cfg, rec, index, top)  # kinds whose latents attend (Lorsa)
        return self.render(
            "feature.html",
            title=f"feature {index} · {sae}",
            cfg=cfg,
            rec=rec,
            f=feat,
            index=index,
            n=n,
            dec_norms=kinds.decoder_norm_rows(rec, feat),
            attention=attention,
            groups=rendered,
            n_flagged=n_flagged,
            hist_svg=Markup(hist),
            neighbours=nbrs,
            analyses=d.analyses_of(sae),
            labels=d.labels(rec, [j for j, _ in nbrs] + [index], wait_s=0.5 if not self.links.static else 3600),
            expl=expl,
            pos=list(zip(feat.get("pos_strs") or [], feat.get("pos_logits") or [])),
            neg=list(zip(feat.get("neg_strs") or [], feat.get("neg_logits") or [])),
            prev=index - 1 if index > 0 else None,
            next=index + 1 if index + 1 < n else None,
            live=live_ok,
            exported=sorted(self.links.features) if self.links.static else None,
            norm_limit=limit,
        )

    def context_html(self, sae: str, analysis_name: str | None, index: int, context_id: int) -> str:
        """The whole context ``context_id`` of a feature's samples, rendered (the "…" of a sample)."""
        d = self.data
        rec = d.analysis_for(sae, analysis_name)
        if rec is None:
            raise NotFound(f"SAE {sae!r} has no analysis yet (run `lake analyze {sae}`)")
        feat = d.feature(rec, index)
        for s in feat.get("samples") or []:
            if s["context_id"] == context_id:
                skip = set(rec.get("excluded_token_ids") or [])
                return str(sample_html(s, float(feat["max_act"] or 0.0), skip, "full"))
        raise NotFound(f"context {context_id} is not a sample of feature {index}")

    def live_page(self, sae: str, analysis_name: str | None = None) -> str:
        cfg = self.data.sae(sae)
        rec = self.data.analysis_for(sae, analysis_name)
        return self.render("live.html", title=f"live · {sae}", cfg=cfg, rec=rec, live=self.live)

    def error_page(self, status: int, message: str) -> str:
        heading = {404: "Not found", 503: "Feature store unavailable"}.get(status, "Error")
        return self.render("error.html", title=heading.lower(), status=status, heading=heading, message=message)


def break_after_dots(s) -> Markup:
    """A hook name that may wrap after its dots (and nowhere else) in a narrow table cell."""
    return Markup(str(escape(s if s is not None else "")).replace(".", ".<wbr>"))


def _act_range(samples: list[dict]) -> str:
    vals = [s["max_act"] for s in samples if s.get("max_act")]
    return f"activations {fnum(min(vals), 3)}–{fnum(max(vals), 3)}" if vals else ""


def sae_row(cfg: dict) -> dict:
    """An SAE's config plus what the pages show of it: its status as it stands now (training with
    progress, stalled, complete) and its held-out numbers (None: not there, shown as "–")."""
    held = cfg.get("holdout") or {}
    return {
        **cfg,
        "shown_status": shown_status(cfg),
        "stalled": stalled(cfg) is not None,
        "heldout_tokens": held.get("tokens_evaluated"),
        "heldout_fvu": held.get("fvu"),
        "heldout_l0": held.get("l0"),
        "heldout_dead_fraction": held.get("dead_fraction"),
    }


def _hyper(cfg: dict) -> tuple[list[tuple[str, object]], list[tuple[str, object]]]:
    """(summary rows, all other hyper-parameters). Metrics say where they were measured."""
    held = f"held-out ({fnum(cfg.get('heldout_tokens'))} tokens)"
    keys = [
        ("arch", "arch"),
        ("hook", "hook"),
        ("out_hook", "out_hook"),
        ("d_in", "d_in"),
        ("d_sae", "d_sae"),
        ("k", "k"),
        ("tokens_trained", "tokens_trained"),
        (f"{held} FVU", "heldout_fvu"),
        (f"{held} L0", "heldout_l0"),
        (f"{held} dead fraction", "heldout_dead_fraction"),
        ("train FVU (in-sample)", "fvu"),
        ("train L0 (in-sample)", "l0"),
        ("train dead fraction (in-sample)", "dead_fraction"),
        ("status", "shown_status"),
        ("model", "model"),
        ("created", "created"),
    ]
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
