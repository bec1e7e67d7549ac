"""``lake export-dashboard``: self-contained static HTML pages of one SAE's features.

Each page inlines its CSS, JavaScript and SVG charts: no server, no network, open from disk or
put on any static host. ``index.html`` is the SAE page (curves, density histogram, the exported
features); ``feature-<i>.html`` one per feature; links between exported pages are relative.
"""

from __future__ import annotations

import os
from pathlib import Path

from saelake.analyze.selection import parse_features
from saelake.lake import UserError

from .data import LakeData, NotFound, StoreDown
from .pages import Renderer, StaticLinks


def export_dashboard(
    lake_uri: str, sae: str, features: str, out_dir: str, analysis: str | None = None, store: str | None = None
) -> list[Path]:
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
