"""The researcher's-review fixes in Chromium: labels and search, keyboard navigation, the sweep view,
token rendering, flagged peaks, notes, the live loading state and a 390 px window."""

from __future__ import annotations

import json
import re
import shutil
import threading

import pytest

from saelake.analyze.explanations import EmbeddedExplanations
from saelake.analyze.labels import token_summaries
from saelake.analyze.stores import EmbeddedStore
from saelake.analyze.web.tokens import peak_flags
from saelake.lake import Lake
from tests.web.web_helpers import cli, get


def summaries(web_lake, analysis="web-sae"):
    lake = Lake(web_lake["lake"])
    return token_summaries(lake, lake.analysis_record(analysis))


def test_labels_and_search_on_the_sae_page(page, server, web_lake):
    sums = summaries(web_lake)
    page.goto(server + "/sae/web-sae?analysis=web-sae")
    held = Lake(web_lake["lake"]).storage.read_json("saes", "web-sae", "config.json")["holdout"]
    assert f"held-out ({held['tokens_evaluated']:,} tokens) FVU" in page.locator("#hyper").inner_text()
    shown = page.locator("#features tbody tr").evaluate_all(
        "rs => rs.map(r => [parseInt(r.dataset.feature), r.querySelector('td.lbl').textContent])"
    )
    assert shown and all(text == sums[f].text() for f, text in shown if sums[f].act)  # tokens when unexplained
    # an explanation replaces the tokens as the label, and search finds it by a word in it
    EmbeddedExplanations(Lake(web_lake["lake"])).update(
        "web-sae", "web-sae", {7: {"explanation": "Zanzibar-shaped tokens", "explainer": "test"}}
    )
    page.fill("#q", "zanzibar")
    page.click("#search button[type=submit]")
    page.wait_for_url(re.compile(r"q=zanzibar"))
    rows = page.locator("#features tbody tr")
    assert rows.evaluate_all("rs => rs.map(r => parseInt(r.dataset.feature))") == [7]
    assert rows.first.locator("td.lbl").inner_text() == "Zanzibar-shaped tokens"
    assert "matching “zanzibar”" in page.locator("#list-count").inner_text()
    # a token one feature fires on finds exactly the features whose tokens contain it
    token = next(s.act[0].strip() for s in sums.values() if s.act and len(s.act[0].strip()) >= 3)
    want = {f for f, s in sums.items() if s.matches(token)} | EmbeddedExplanations(Lake(web_lake["lake"])).search(
        "web-sae", token
    )  # explanations and notes
    page.goto(server + "/sae/web-sae?analysis=web-sae")
    page.fill("#q", token)
    page.press("#q", "Enter")
    page.wait_for_url(re.compile(r"q="))
    got = page.locator("#features tbody tr").evaluate_all("rs => rs.map(r => parseInt(r.dataset.feature))")
    assert got == sorted(want) and got
    # the feature page shows the label and the neighbours theirs
    page.goto(server + "/sae/web-sae/feature/7?analysis=web-sae")
    assert page.locator("#label").inner_text() == "Zanzibar-shaped tokens"
    nb = page.locator("#neighbours tr").evaluate_all(
        "rs => rs.map(r => [parseInt(r.dataset.feature), r.querySelector('td.lbl').textContent])"
    )
    assert nb and all(text == sums[j].text() for j, text in nb if j != 7)


def test_keyboard_navigation(page, server):
    page.goto(server + "/sae/web-sae/feature/5?analysis=web-sae")
    for key, want in (("j", 6), ("ArrowRight", 7), ("k", 6), ("ArrowLeft", 5)):
        page.keyboard.press(key)
        page.wait_for_url(re.compile(rf"/feature/{want}\?"))
    page.click("#live textarea")  # typing in a text box never navigates
    page.keyboard.press("j")
    page.keyboard.press("ArrowRight")
    assert re.search(r"/feature/5\?", page.url)
    # the feature list: j/k or arrows move the selection, Enter opens it
    page.goto(server + "/sae/web-sae?analysis=web-sae&sort=density&desc=1")
    order = page.locator("#features tbody tr").evaluate_all("rs => rs.map(r => r.dataset.feature)")
    for key in ("j", "ArrowDown", "j", "k"):
        page.keyboard.press(key)
    assert page.locator("#features tr.sel").get_attribute("data-feature") == order[1]
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(rf"/feature/{order[1]}\?analysis=web-sae$"))


@pytest.fixture(scope="module")
def eval_lake(web_lake, tmp_path_factory):
    """A copy of the web lake where `lake eval` ran on web-sae (CE loss recovered), served."""
    from saelake.analyze.web import WebApp, start_in_thread

    root = tmp_path_factory.mktemp("sweep") / "lake"
    shutil.copytree(web_lake["lake"], root)
    code, out, err = cli("eval", "--lake", str(root), "web-sae", "--tokens", "256", "--batch-size", "4")
    assert code == 0, err
    srv, _ = start_in_thread(WebApp(str(root), live=False), port=0)
    yield str(root), f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_sweep_view_and_dead_dense_counts(page, eval_lake):
    root, url = eval_lake
    lake = Lake(root)
    cfgs = {n: lake.storage.read_json("saes", n, "config.json") for n in ("web-sae", "bare")}
    page.goto(url + "/")
    sweep = page.locator("#sweeps section.sweep[data-run=r1]")
    assert sweep.count() == 1 and "blocks.0.hook_resid_post" in sweep.get_attribute("data-hook")
    pts = sweep.locator("svg.sweep-fvu circle.pt").evaluate_all(
        "cs => cs.map(c => [c.dataset.sae, parseFloat(c.dataset.l0), parseFloat(c.dataset.y)])"
    )
    assert sorted(p[0] for p in pts) == ["bare", "web-sae"]
    for name, l0, fvu in pts:  # the held-out numbers
        assert l0 == pytest.approx(cfgs[name]["holdout"]["l0"], rel=1e-4)
        assert fvu == pytest.approx(cfgs[name]["holdout"]["fvu"], rel=1e-4)
    ce = sweep.locator("svg.sweep-ce circle.pt").evaluate_all("cs => cs.map(c => [c.dataset.sae, c.dataset.y])")
    assert [c[0] for c in ce] == ["web-sae"]  # only where lake eval ran
    assert float(ce[0][1]) == pytest.approx(cfgs["web-sae"]["eval"]["ce_loss_recovered"], rel=1e-4)
    # dead / dense counts from the analysis
    sc = EmbeddedStore(lake).scalars("web-sae")
    row = page.locator("#saes tr[data-sae=web-sae]")
    assert int(row.locator("td.dead").inner_text()) == sum(r["count"] == 0 for r in sc)
    assert int(row.locator("td.dense").inner_text()) == sum(r["density"] > 0.1 for r in sc)
    assert page.locator("#saes tr[data-sae=bare] td.dead").inner_text() == "–"  # no analysis
    point = sweep.locator("svg.sweep-fvu circle.pt").last  # the two were trained alike: the top one of two
    name = point.get_attribute("data-sae")
    point.click()
    page.wait_for_url(re.compile(rf"/sae/{name}$"))
    assert page.locator("h1 code").inner_text() == name


def test_token_rendering_peak_intervals_and_flags(page, server, web_lake):
    lake = Lake(web_lake["lake"])
    rec = lake.analysis_record("web-sae")
    skip = set(rec.excluded_token_ids)
    st = EmbeddedStore(lake)
    feats = [st.feature("web-sae", i) for i in range(rec.n_features)]
    # a feature with an early-position peak among its examples (contexts of 32 tokens: there are some)
    early = [(sum(bool(peak_flags(s, skip, None, None)) for s in f["samples"]), f) for f in feats]
    n_early, feat = max(early, key=lambda t: t[0])
    assert n_early > 0
    page.goto(server + f"/sae/web-sae/feature/{feat['feature']}?analysis=web-sae")
    # the peak token is outlined (a shape), other shaded tokens are not
    style = "t => [getComputedStyle(t).outlineStyle, getComputedStyle(t).outlineWidth, getComputedStyle(t).fontWeight]"
    assert page.locator(".sample .t.peak").first.evaluate(style) == ["solid", "2px", "700"]
    others = page.locator(".sample .t.on:not(.peak)")
    if others.count():
        assert others.first.evaluate(style)[0] == "none"
    assert page.locator(".group .sample").first.locator(".t.peak").count() == 1
    # interval groups: activation ranges, none of the top contexts again
    top_ids = set(page.locator("#group-top .sample").evaluate_all("ss => ss.map(s => s.dataset.context)"))
    for g in page.locator("section.group[id^=group-interval]").all():
        assert re.search(r"activations [\d.e-]+–[\d.e-]+", g.locator("h2").inner_text())
        assert not top_ids & set(g.locator(".sample").evaluate_all("ss => ss.map(s => s.dataset.context)"))
    # flagged peaks: counted, marked, hidden by the toggle
    shown = page.locator(".group .sample.flagged")
    n = shown.count()
    assert n >= 1 and "early" in shown.first.get_attribute("data-flags")
    assert f"hide the {n} example{'s' if n != 1 else ''} whose" in page.locator("#flags").inner_text()
    assert shown.first.is_visible()
    page.check("#hide-flagged")
    assert not shown.first.is_visible() and page.locator(".group .sample:not(.flagged)").first.is_visible()


def test_whitespace_and_byte_tokens_in_live_inference(page, server):
    page.goto(server + "/sae/web-sae/feature/3?analysis=web-sae")
    page.fill("#live textarea", "a  \n\tb 日本")
    page.click("#live button[type=submit]")
    page.wait_for_selector("#live-out .live-tokens")
    toks = page.locator("#live-out .t").evaluate_all("ts => ts.map(t => [t.textContent, t.className, t.title])")
    assert all(text.strip() for text, _, _ in toks)  # nothing renders as an empty blob
    ws = [t for t in toks if " ws" in t[1]]
    assert ws and all(set(t[0]) <= set("·↵⇥") for t in ws)
    byte = [t for t in toks if " byte" in t[1]]
    assert byte and all(re.search(r"<0x[0-9A-F]{2}>", t[0]) and re.search(r"· id \d+ ·", t[2]) for t in byte)


def test_notes_are_saved_and_shown(page, server, mongo_ui, web_lake):
    for url, analysis in ((server, "web-sae"), (mongo_ui, "web-sae-mongo")):
        page.goto(url + f"/sae/web-sae/feature/11?analysis={analysis}")
        page.fill("#note textarea", "looks like a position feature")
        page.click("#note button[type=submit]")
        page.wait_for_function("document.getElementById('note-status').textContent === 'saved'")
        page.reload()
        assert page.locator("#note textarea").input_value() == "looks like a position feature"
    rows = EmbeddedExplanations(Lake(web_lake["lake"])).rows("web-sae", [11])
    assert rows[11]["note"] == "looks like a position feature" and rows[11]["explanation"] is None
    # JSON from this server's pages only
    body = json.dumps({"sae": "web-sae", "analysis": "web-sae", "feature": 11, "note": "x"}).encode()
    assert get(server, "/api/note", "POST", body, {"Content-Type": "text/plain"})[0] == 415
    status, _, _ = get(
        server, "/api/note", "POST", body, {"Content-Type": "application/json", "Origin": "http://evil.example"}
    )
    assert status == 403
    bad = json.dumps({"sae": "web-sae", "analysis": "web-sae", "feature": 64, "note": "x"}).encode()
    assert get(server, "/api/note", "POST", bad, {"Content-Type": "application/json"})[0] == 404


def test_live_shows_a_loading_state_while_the_model_loads(page, web_lake):
    from saelake.analyze.web import WebApp, start_in_thread
    from saelake.analyze.web.live import LiveEncoder

    release = threading.Event()

    class GatedLoad(LiveEncoder):  # the real model load, held until the test has seen the loading state
        def _model(self, spec):
            release.wait(30)
            return super()._model(spec)

    app = WebApp(web_lake["lake"])
    app.live = GatedLoad(app.data)
    srv, _ = start_in_thread(app, port=0)
    try:
        page.goto(f"http://127.0.0.1:{srv.server_address[1]}/sae/web-sae/live")
        page.fill("#live textarea", "The target list")
        page.click("#live button[type=submit]")
        loading = page.locator("#live-loading")
        loading.wait_for()
        assert "loading model" in loading.inner_text() and page.locator("#live button[type=submit]").is_disabled()
        release.set()
        page.wait_for_selector("#live-out table.livetop")
        assert page.locator("#live-loading").count() == 0
        # the next run: the model is loaded, no loading state
        assert json.loads(get(f"http://127.0.0.1:{srv.server_address[1]}", "/api/live/status?sae=web-sae")[2])["loaded"]
        labels = page.locator("#live-out .lbl")
        assert labels.count() > 0  # each feature shown with its short label
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("path", ["/sae/web-sae/feature/{f}?analysis=web-sae", "/sae/web-sae?analysis=web-sae"])
def test_pages_fit_a_390px_window(browser, server, web_lake, path):
    f = max(EmbeddedStore(Lake(web_lake["lake"])).scalars("web-sae"), key=lambda r: r["count"])["feature"]
    ctx = browser.new_context(viewport={"width": 390, "height": 844})
    pg = ctx.new_page()
    try:
        pg.goto(server + path.format(f=f))
        assert pg.evaluate("document.documentElement.scrollWidth") <= 390
        for box in pg.locator(".card, svg.chart, .sample").all():
            b = box.bounding_box()
            assert b["x"] >= 0 and b["x"] + b["width"] <= 390, b
        if "feature" in path:
            assert pg.locator(".cards").evaluate("c => getComputedStyle(c).flexWrap") == "wrap"  # more cards wrap
    finally:
        ctx.close()


def test_export_carries_explanations_scores_and_search(web_lake, tmp_path, browser):
    root = tmp_path / "lake"
    shutil.copytree(web_lake["lake"], root)
    EmbeddedExplanations(Lake(str(root))).update(
        "web-sae",
        "web-sae",
        {
            2: {
                "explanation": "walrus mentions",
                "explainer": "test",
                "detection": 0.9,
                "fuzzing": 0.7,
                "score_examples": [1, 2, 3],
                "scorer": "test",
                "note": "checked by hand",
            },
            3: {"explanation": "penguin facts", "explainer": "test"},
        },
    )
    out = tmp_path / "dash"
    code, _, err = cli(
        "export-dashboard", "--lake", str(root), "web-sae", "--features", "0-9", "-o", str(out), "--analysis", "web-sae"
    )
    assert code == 0, err
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        page.goto((out / "index.html").as_uri())
        row = page.locator("#features tr[data-feature='2']")
        assert row.locator("td.lbl").inner_text() == "walrus mentions" and "0.90" in row.inner_text()
        page.fill("#q", "WALRUS")
        page.press("#q", "Enter")
        visible = page.locator("#features tbody tr:visible").evaluate_all("rs => rs.map(r => r.dataset.feature)")
        assert visible == ["2"]
        page.fill("#q", "hand")  # notes are searched too
        page.press("#q", "Enter")
        assert page.locator("#features tbody tr:visible").count() == 1
        page.fill("#q", "")
        page.press("#q", "Enter")
        assert page.locator("#features tbody tr:visible").count() == 10
        row.locator("a").click()
        page.wait_for_url(re.compile(r"feature-2\.html$"))
        assert page.locator("#label").inner_text() == "walrus mentions"
        assert page.locator("#detection").inner_text() == "0.90" and page.locator("#fuzzing").inner_text() == "0.70"
        assert "checked by hand" in page.locator("#note-text").inner_text() and page.locator("#note").count() == 0
        page.keyboard.press("j")  # keyboard navigation between exported pages
        page.wait_for_url(re.compile(r"feature-3\.html$"))
        assert page.locator("#label").inner_text() == "penguin facts"
    finally:
        ctx.close()
