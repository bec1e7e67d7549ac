"""The web UI in a real headless Chromium (Playwright) against `lake serve`'s app on a free port,
over a lake built by the fixtures: tiny model, really trained SAE, real analyses (Lance + MongoDB)."""

from __future__ import annotations

import re

import pytest
import torch

from saelake.analyze.stores import EmbeddedStore, MongoStore
from saelake.analyze.web.tokens import window
from saelake.lake import Lake, load_model
from saelake.train.store import SAEStore

ALPHA = re.compile(r"rgba?\(255,\s*102,\s*0(?:,\s*([\d.]+))?\)")  # alpha 1 is written rgb(...)


def stored(web_lake, analysis="web-sae", index=None):
    if analysis.endswith("mongo"):
        st = MongoStore(web_lake["store"])
    else:
        st = EmbeddedStore(Lake(web_lake["lake"]))
    return st.feature(analysis, index)


def busiest(web_lake, analysis="web-sae") -> int:
    sc = EmbeddedStore(Lake(web_lake["lake"])).scalars(analysis)
    return max(sc, key=lambda r: r["count"])["feature"]


def test_lake_page_lists_runs_saes_analyses_sortable(page, server):
    page.goto(server + "/")
    assert page.locator("#runs tr[data-run=r1]").count() == 1
    row = page.locator("#runs tr[data-run=r1]").inner_text()
    assert "4,000" in row and "float16" in row and "blocks.0.hook_resid_post" in row and "MB" in row
    assert page.locator("#snapshots tbody tr").count() == 1
    sae = page.locator("#saes tr[data-sae=web-sae]").inner_text()
    assert "topk" in sae and "64" in sae and "4,096" in sae
    assert set(page.locator("#analyses tr").evaluate_all("rs => rs.map(r => r.dataset.analysis)")) >= {
        "web-sae",
        "web-sae-mongo",
    }
    names = lambda: page.locator("#saes tbody tr").evaluate_all("rs => rs.map(r => r.dataset.sae)")  # noqa: E731
    assert names() == ["bare", "web-sae"]
    page.locator("#saes th", has_text="SAE").click()
    assert names() == ["bare", "web-sae"]  # ascending first
    page.locator("#saes th", has_text="SAE").click()
    assert names() == ["web-sae", "bare"]
    page.locator("#runs a", has_text="r1").click()
    assert "Run r1" in page.locator("h1").inner_text() and page.locator("text=hook_mlp_out").count() >= 1


def test_sae_page_curves_histogram_and_paged_filtered_list(page, server, web_lake):
    page.goto(server + "/sae/web-sae?analysis=web-sae")
    for metric in ("loss", "fvu", "l0", "dead_fraction"):
        line = page.locator(f"#curves svg.curve-{metric} polyline.series")
        assert line.count() == 1, metric
        assert len(line.get_attribute("points").split()) == 16  # one point per training step
    bars = page.locator("svg.density rect.bar")
    counts = bars.evaluate_all("bs => bs.map(b => parseInt(b.dataset.count))")
    dead = page.locator("svg.density rect.bar.dead title").text_content()
    assert sum(counts) == 64 and dead.startswith("dead: ")
    assert "density" in page.locator("svg.density").get_attribute("aria-label")
    # 64 features, 50 a page, server-side
    assert page.locator("#features tbody tr").count() == 50
    assert "1–50 of 64" in page.locator("#list-count").inner_text()
    page.locator("#pager a[rel=next]").click()
    assert page.locator("#features tbody tr").count() == 14
    # filter by density, sort by max activation descending
    sc = EmbeddedStore(Lake(web_lake["lake"])).scalars("web-sae")
    dmin = sorted(r["density"] for r in sc)[40]
    page.fill("input[name=dmin]", repr(dmin))
    page.select_option("select[name=sort]", "max_act")
    page.check("input[name=desc]")
    page.click("#filters button[type=submit]")
    rows = page.locator("#features tbody tr").evaluate_all("rs => rs.map(r => parseInt(r.dataset.feature))")
    want = sorted((r for r in sc if r["density"] >= dmin), key=lambda r: -r["max_act"])
    assert rows == [r["feature"] for r in want]
    assert "filtered from 64" in page.locator("#list-count").inner_text()


def shown_order(feat):
    """The samples a feature page shows, in order: top, each interval (without the top contexts), zero."""
    top = [s for s in feat["samples"] if s["kind"] == "top"]
    ids = {s["context_id"] for s in top}
    inter = sorted(
        (s for s in feat["samples"] if s["kind"] == "interval" and s["context_id"] not in ids),
        key=lambda s: s["interval"],
    )
    return top + inter + [s for s in feat["samples"] if s["kind"] == "zero"]


def _check_shading(page, feat, skip):
    """Every sample on the page shows the stored tokens of its window around the peak; activating ones
    carry the stored value and a background whose alpha is activation / feature max."""
    fmax = feat["max_act"]
    order = shown_order(feat)
    assert page.locator(".group .sample").count() == len(order)
    spans = page.locator(".group .sample").evaluate_all(
        "ss => ss.map(s => Array.from(s.querySelectorAll('.t')).map(t => [t.dataset.i, t.dataset.act || null, "
        "getComputedStyle(t).backgroundColor, t.title]))"
    )
    n_on = 0
    for s, toks in zip(order, spans):
        lo, hi = window(s, skip)
        assert [int(t[0]) for t in toks] == list(range(lo, hi))  # only the window is sent
        acts = dict(zip(s["positions"], s["acts"]))
        for i, act, bg, title in toks:
            a = acts.get(int(i))
            assert f"id {s['tokens'][int(i)]}" in title
            if a is None:
                assert act is None and title.endswith("· 0")
                continue
            n_on += 1
            assert float(act) == pytest.approx(a, rel=1e-5)
            m = ALPHA.search(bg)
            assert m, bg
            assert float(m.group(1) or 1.0) == pytest.approx(min(1.0, a / fmax), abs=0.01)
            assert f"{a:.4g}" in title
    assert n_on > 0


def test_feature_page_from_list_with_shaded_tokens(page, server, web_lake):
    f = busiest(web_lake)
    page.goto(server + "/sae/web-sae?analysis=web-sae&sort=density&desc=1")
    page.locator(f"#features tr[data-feature='{f}'] a").click()
    page.wait_for_url(re.compile(rf"/sae/web-sae/feature/{f}\?analysis=web-sae$"))
    feat = stored(web_lake, "web-sae", f)
    assert page.locator("#feature").get_attribute("data-feature") == str(f)
    assert page.locator("#density").inner_text().endswith("%")
    assert f"{feat['max_act']:.4g}" == page.locator("#max-act").inner_text()
    assert page.locator("svg.acts rect.bar").count() == len(feat["hist_counts"])
    assert page.locator("#pos-logits tr").count() == len(feat["pos_strs"]) == 10
    assert page.locator("#neg-logits tr").count() == 10
    assert page.locator("#neighbours a").count() == len(feat["neighbours"])
    skip = set(Lake(web_lake["lake"]).analysis_record("web-sae").excluded_token_ids)
    _check_shading(page, feat, skip)
    # top group: the context's max is the largest shaded value
    first = page.locator("#group-top .sample").first
    vals = first.locator(".t.on").evaluate_all("ts => ts.map(t => parseFloat(t.dataset.act))")
    assert max(vals) == pytest.approx(float(first.get_attribute("data-max")), rel=1e-5)
    # the rest of a context is fetched when "…" is clicked, shaded the same way
    sample = page.locator(".sample:has(.more)").first
    assert sample.count() == 1
    ctx = int(sample.get_attribute("data-context"))
    sample = page.locator(f".sample[data-context='{ctx}']").first
    full = next(s for s in feat["samples"] if s["context_id"] == ctx)
    assert 0 < sample.locator(".t").count() < len(full["strs"])
    sample.locator(".more").first.click()
    page.wait_for_function(
        f"document.querySelector('.sample[data-context=\"{ctx}\"]').querySelectorAll('.t')"
        f".length === {len(full['strs'])}"
    )
    acts = sample.locator(".t.on").evaluate_all("ts => ts.map(t => [parseInt(t.dataset.i), parseFloat(t.dataset.act)])")
    assert dict(acts) == pytest.approx(dict(zip(full["positions"], full["acts"])), rel=1e-5)
    # neighbours, prev/next and the random button navigate to feature pages
    nb = feat["neighbours"][0]
    page.locator("#neighbours a").first.click()
    page.wait_for_url(re.compile(rf"/feature/{nb}\?"))
    page.locator("#next").click() if nb < 63 else page.locator("#prev").click()
    page.wait_for_url(re.compile(rf"/feature/{nb + 1 if nb < 63 else nb - 1}\?"))
    page.locator("#random").click()
    page.wait_for_url(re.compile(r"/sae/web-sae/feature/\d+\?analysis=web-sae$"))
    assert page.locator(".group").count() == 5


def _direct(web_lake, text, feature=None):
    """Per-token activations computed here, without the server (BOS prepended, then left out)."""
    model = load_model(web_lake["model"])
    sae, cfg = SAEStore(web_lake["lake"]).load("web-sae")
    ids = [model.bos_token_id] + model.tokenizer(text, add_special_tokens=False)["input_ids"]
    x = model.activations(torch.tensor([ids]), [cfg["hook"]])[cfg["hook"]][0]
    with torch.no_grad():
        f = sae.encode(x.float()).dense()[0][1:]
    return f, len(ids) - 1


def test_live_inference_for_a_feature_and_for_the_sae(page, server, web_lake):
    text = "The target list contains the object."
    f_all, n = _direct(web_lake, text)
    f = int(f_all.max(0).values.argmax())  # a feature that fires on this text
    page.goto(server + f"/sae/web-sae/feature/{f}?analysis=web-sae")
    page.fill("#live textarea", text)
    page.click("#live button[type=submit]")
    page.wait_for_selector("#live-out .live-tokens")
    got = page.locator("#live-out .t").evaluate_all("ts => ts.map(t => parseFloat(t.dataset.act))")
    assert len(got) == n
    assert got == pytest.approx(f_all[:, f].tolist(), abs=1e-5)
    assert page.locator("#live-out .t.on").count() == int((f_all[:, f] > 0).sum())
    # the whole SAE: top features per token, linked to their pages
    page.goto(server + "/sae/web-sae")
    page.click("#live-link")
    page.fill("#live textarea", text)
    page.fill("#live input[name=top]", "3")
    page.click("#live button[type=submit]")
    page.wait_for_selector("#live-out table.livetop")
    rows = page.locator("#live-out tbody tr")
    assert rows.count() == n
    top0 = [int(a.inner_text()) for a in rows.first.locator("a").all()]
    vals, idx = f_all[0].topk(3)
    assert top0 == [int(i) for i, v in zip(idx, vals) if v > 0]
    rows.first.locator("a").first.click()
    page.wait_for_url(re.compile(rf"/sae/web-sae/feature/{top0[0]}\?analysis="))
    # bad live input: a JSON error shown in the box, the server keeps serving
    page.goto(server + f"/sae/web-sae/feature/{f}")
    page.click("#live button[type=submit]")
    page.wait_for_selector("#live-out .err")
    assert "type some text" in page.locator("#live-out .err").inner_text()


def test_same_pages_with_the_mongodb_store(page, mongo_ui, web_lake):
    page.goto(mongo_ui + "/")
    assert "mongodb://" in page.locator(".note").inner_text()
    page.locator("#saes a", has_text="web-sae").click()
    assert page.locator("#analysis-name").inner_text() == "web-sae-mongo"  # --store's analysis is the default
    assert page.locator("#curves svg").count() == 4 and page.locator("svg.density rect.bar").count() > 1
    assert page.locator("#features tbody tr").count() == 50
    f = busiest(web_lake)
    page.goto(mongo_ui + "/sae/web-sae?sort=density&desc=1")
    page.locator(f"#features tr[data-feature='{f}'] a").click()
    page.wait_for_url(re.compile(rf"/feature/{f}\?analysis=web-sae-mongo$"))
    feat = stored(web_lake, "web-sae-mongo", f)
    assert feat == stored(web_lake, "web-sae", f)
    _check_shading(page, feat, set(Lake(web_lake["lake"]).analysis_record("web-sae-mongo").excluded_token_ids))


NOT_FOUND = [
    ("/run/nope", "no run 'nope'"),
    ("/sae/nope", "no SAE 'nope'"),
    ("/sae/nope/feature/1", "no SAE 'nope'"),
    ("/sae/web-sae?analysis=nope", "no analysis 'nope' of SAE 'web-sae'"),
    ("/sae/web-sae/feature/64", "no feature 64 in analysis"),
    ("/sae/web-sae/feature/abc", "no feature 'abc'"),
    ("/sae/bare/feature/0", "SAE 'bare' has no analysis yet"),
    ("/sae/%2E%2E%2F%2E%2E%2Fetc", "no SAE '../../etc'"),
    ("/run/..%2f..%2fcatalog.duckdb", "no run '../../catalog.duckdb'"),
    ("/sae/" + "x" * 3000, "(3000 characters)"),
    ("/static/app.js", "no page"),
]


@pytest.mark.parametrize("path,message", NOT_FOUND)
def test_not_found_pages_say_what(page, server, path, message):
    resp = page.goto(server + path)
    assert resp.status == 404
    assert message in page.locator("#error .message").inner_text()


def test_path_like_ids_through_the_browser_url_parser(page, server):
    # Chromium resolves ../ and %2e%2e before sending: whatever it asks for is a 404, never a file
    for path in ("/sae/../../etc/passwd", "/sae/%2e%2e/%2e%2e/manifest.json", "/run/r1/../../catalog.duckdb"):
        resp = page.goto(server + path)
        assert resp.status == 404, path
        assert page.locator("#error").count() == 1
