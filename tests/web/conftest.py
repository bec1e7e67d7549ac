"""Fixtures for the web UI tests: one lake with a trained SAE and two real analyses (embedded and
MongoDB), a server per store on a free port in a thread, and one headless Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

H0 = "blocks.0.hook_resid_post"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def web_lake(tmp_path_factory, tiny_lake, tiny_model, mongo_server) -> dict:
    """tiny lake + SAE ``web-sae`` (topk, 64 latents, really trained) + analyses ``web-sae`` (embedded)
    and ``web-sae-mongo`` (MongoDB) + an SAE without analysis (``bare``)."""
    import torch

    from saelake.analyze import AnalyzeConfig, analyze
    from saelake.train import SAEConfig, train

    root = tmp_path_factory.mktemp("web") / "lake"
    shutil.copytree(tiny_lake, root, ignore=shutil.ignore_patterns("catalog.duckdb*"))
    root = str(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("web-sae", "bare"):
            train(
                root,
                [SAEConfig(name=name, arch="topk", hooks=[H0], expansion=2, k=4, lr=3e-3)],
                run="r1",
                tokens=4096,
                batch_size=256,
                repeat=True,
                progress=False,
            )
        kw = dict(lake=root, sae="web-sae", batch_size=16, top_k=6, per_interval=2, n_zero=2)
        analyze(AnalyzeConfig(**kw), progress=False)
        store = mongo_server + "web"
        analyze(AnalyzeConfig(**kw, name="web-sae-mongo", store=store), progress=False)
    finally:
        torch.set_num_threads(threads)
    return {"lake": root, "store": store, "model": tiny_model}


def _serve(app):
    from saelake.analyze.web import start_in_thread

    server, thread = start_in_thread(app, port=0)
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="session")
def server(web_lake):
    """The UI over the lake (embedded store by default; MongoDB analyses through their records)."""
    from saelake.analyze.web import WebApp

    srv, url = _serve(WebApp(web_lake["lake"]))
    yield url
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="session")
def mongo_ui(web_lake):
    """The UI started with --store mongodb://...: MongoDB analyses are the default ones."""
    from saelake.analyze.web import WebApp

    srv, url = _serve(WebApp(web_lake["lake"], store=web_lake["store"]))
    yield url
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium through Playwright. Missing -> the tests fail (make test installs it)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the web UI tests need Debian's chromium "
            "(`make browser` or apt-get install -y chromium)",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(15_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on(
        "request",
        lambda r: (
            errors.append(f"external request {r.url}")
            if not r.url.startswith(("http://127.0.0.1", "file://", "data:", "about:"))
            else None
        ),
    )
    pg.js_errors = errors
    yield pg
    ctx.close()
    assert not errors, errors
