"""``lake export-dashboard``: self-contained static HTML pages of one SAE's features.

Each page inlines its CSS, JavaScript and SVG charts: no server, no network, open from disk or
put on any static host. ``index.html`` is the SAE page (curves, density histogram, the exported
features); ``feature-<i>.html`` one per feature; links between exported pages are relative.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from saelake.lake import UserError

from .data import LakeData, NotFound, StoreDown
from .pages import Renderer, StaticLinks

MAX_FEATURES = 100_000


def parse_features(spec: str, n: int) -> list[int]:
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
        if b - a + 1 + len(out) > MAX_FEATURES:
            raise UserError(f"--features selects more than {MAX_FEATURES} features: export fewer")
        out.update(range(a, b + 1))
    if not out:
        raise UserError("--features selects nothing")
    return sorted(out)


def export_dashboard(lake_uri: str, sae: str, features: str, out_dir: str, analysis: str | None = None,
                     store: str | None = None) -> list[Path]:
    data = LakeData(lake_uri, store=store)
    try:
        data.sae(sae)
        rec = data.analysis_for(sae, analysis)
        if rec is None:
            raise UserError(f"SAE {sae!r} has no analysis yet: run `lake analyze {sae}` first")
        indices = parse_features(features, int(rec["n_features"]))
        renderer = Renderer(data, StaticLinks(set(indices)), live=False)
        out = Path(out_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"-o {out} is a file: give a directory")
        out.mkdir(parents=True, exist_ok=True)
        written = [_write(out / "index.html", renderer.sae_page(sae, {}, rec["name"], only=indices))]
        for i in indices:
            written.append(_write(out / f"feature-{i}.html", renderer.feature_page(sae, i, rec["name"])))
    except NotFound as e:
        raise UserError(str(e)) from None
    except StoreDown as e:
        raise UserError(str(e)) from None
    return written


def _write(path: Path, html: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path
