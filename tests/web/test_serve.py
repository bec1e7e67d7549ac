"""`lake serve` and `lake export-dashboard` as commands; raw HTTP bad input; an unreachable store."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.web.web_helpers import cli, free_port, get

REPO = Path(__file__).resolve().parents[2]

RAW_404 = [
    "/sae/../../etc/passwd",
    "/sae/%2e%2e/%2e%2e/etc/passwd",
    "/run/%2E%2E",
    "/run/r1/..",
    "/../../etc/passwd",
    "//etc/passwd",
    "/sae/web-sae/feature/%2e%2e",
    "/sae/web-sae/feature/1%2f..",
    "/run/r1%00",
    "/sae/web-sae/feature/99999999999999999999",
    "/sae/web-sae/feature/%D9%A3",
    "/run/" + "%2e" * 2000,
    "/sae/web-sae/../../../saes/web-sae/config.json",
    "/analyses/web-sae/analysis.json",
    "/runs/r1/manifest.json",
    "/catalog.duckdb",
]


@pytest.mark.parametrize("path", RAW_404)
def test_raw_path_like_ids_are_404_never_files(server, path):
    status, headers, body = get(server, path)
    assert status == 404, (path, status)
    assert 'id="error"' in body and headers["Content-Type"].startswith("text/html")
    assert "root:" not in body and '"hooks"' not in body and "DUCK" not in body


def test_api_live_bad_input(server):
    post = lambda obj: get(
        server,
        "/api/live",
        "POST",
        json.dumps(obj).encode(),  # noqa: E731
        {"Content-Type": "application/json"},
    )
    status, _, body = post({"sae": "nope", "text": "hi"})
    assert status == 404 and "no SAE 'nope'" in json.loads(body)["error"]
    status, _, body = post({"sae": "../etc", "text": "hi"})
    assert status == 404
    status, _, body = post({"sae": "web-sae", "text": "hi", "feature": 64})
    assert status == 404 and "no feature 64" in json.loads(body)["error"]
    status, _, body = post({"sae": "web-sae", "text": "hi", "feature": "3"})
    assert status == 400
    status, _, body = post({"sae": "web-sae", "text": "x" * 5000})
    assert status == 400 and "too long" in json.loads(body)["error"]
    status, _, body = get(server, "/api/live", "POST", b"not json")
    assert status == 400
    status, _, _ = get(server, "/api/live", "POST", b"{}", {"Content-Length": str(10**9)})
    assert status == 413
    status, _, body = post({"sae": "web-sae", "text": "hello", "feature": 3})
    assert status == 200 and len(json.loads(body)["acts"]) == len(json.loads(body)["tokens"])
    assert get(server, "/")[0] == 200


def test_pages_render_fast(server):
    for path in ("/", "/sae/web-sae", "/sae/web-sae/feature/5"):
        get(server, path)
        t0 = time.perf_counter()
        status, headers, _ = get(server, path)
        assert status == 200
        assert time.perf_counter() - t0 < 1.0, path
        assert float(headers["Server-Timing"].split("dur=")[1]) < 1000


def test_store_unreachable_page_says_so_server_keeps_running(web_lake):
    from saelake.analyze.web import WebApp, start_in_thread

    dead = f"mongodb://127.0.0.1:{free_port()}/web"
    app = WebApp(web_lake["lake"], store=dead)
    app.data.store_timeout_s = 0.5
    srv, _ = start_in_thread(app, port=0)
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        status, _, body = get(base, "/")
        assert status == 200 and "web-sae-mongo" in body  # the lake's records still list it
        status, _, body = get(base, "/sae/web-sae?analysis=web-sae-mongo")
        assert status == 200 and 'id="store-error"' in body and "unreachable" in body
        assert "loss" in body  # curves come from the lake, not the store
        status, _, body = get(base, "/sae/web-sae/feature/3?analysis=web-sae-mongo")
        assert status == 503 and "feature store unreachable" in body and "127.0.0.1" in body
        status, _, body = get(base, "/sae/web-sae/feature/3?analysis=web-sae")  # the embedded one still works
        assert status == 200 and 'class="sample"' in body
        assert get(base, "/")[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_serve_port_in_use_one_clear_line(web_lake):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, out, err = cli("serve", "--lake", web_lake["lake"], "--port", str(port))
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"port {port}" in lines[0] and "in use" in lines[0] and "--port" in lines[0], err
    code, _, err = cli("serve", "--lake", web_lake["lake"], "--port", "70000")
    assert code == 2 and "--port" in err
    code, _, err = cli("serve", "--lake", str(Path(web_lake["lake"]).parent / "missing"), "--port", "0")
    assert code == 2 and "no lake at" in err


def test_lake_serve_command_binds_loopback(web_lake):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "saelake.lake",
            "serve",
            "--lake",
            web_lake["lake"],
            "--port",
            str(port),
            "--quiet",
            "--no-live",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        line = p.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, (line, p.stderr.read() if p.poll() is not None else "")
        status, _, body = get(f"http://127.0.0.1:{port}", "/")
        assert status == 200 and "web-sae" in body
        status, _, body = get(f"http://127.0.0.1:{port}", "/api/live", "POST", b'{"sae":"web-sae","text":"a"}')
        assert status == 503 and "off" in body
        with socket.socket() as s:  # bound to loopback only
            assert s.connect_ex(("127.0.0.1", port)) == 0
        addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
        for a in addrs:
            if not a.startswith("127."):
                with socket.socket() as s:
                    s.settimeout(1)
                    assert s.connect_ex((a, port)) != 0
    finally:
        p.terminate()
        p.wait(10)


def test_export_dashboard_static_pages(web_lake, tmp_path, browser):
    out = tmp_path / "dash"
    code, stdout, err = cli(
        "export-dashboard",
        "--lake",
        web_lake["lake"],
        "web-sae",
        "--features",
        "0-9,20",
        "-o",
        str(out),
        "--analysis",
        "web-sae",
    )
    assert code == 0, err
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["index.html"] + [f"feature-{i}.html" for i in [*range(10), 20]])
    for f in out.iterdir():
        html = f.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), f  # nothing from the network
        assert "/static/" not in html and "fetch(" not in html.split("<script>")[0]
    ctx = browser.new_context()
    page = ctx.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((out / "index.html").as_uri())
    assert page.locator("#curves svg").count() == 4 and page.locator("svg.density").count() == 1
    assert page.locator("#features tbody tr").count() == 11
    page.locator("#features tr[data-feature='20'] a").click()
    page.wait_for_url(re.compile(r"feature-20\.html$"))
    assert page.locator(".group .t.on").count() > 0 and page.locator("#live").count() == 0
    page.locator("#random").click()
    page.wait_for_url(re.compile(r"feature-(\d|20)\.html$"))
    assert all(u.startswith("file://") for u in requests), requests
    ctx.close()
    # the MongoDB analysis exports the same pages
    code, _, err = cli(
        "export-dashboard",
        "--lake",
        web_lake["lake"],
        "web-sae",
        "--features",
        "3",
        "-o",
        str(tmp_path / "m"),
        "--analysis",
        "web-sae-mongo",
        "--store",
        web_lake["store"],
    )
    assert code == 0, err
    strip = lambda s: re.sub(r"web-sae-mongo|web-sae", "X", s)  # noqa: E731
    tokens = lambda s: re.findall(r'<span class="t[^"]*"[^>]*>', strip(s))  # noqa: E731
    assert tokens((tmp_path / "m" / "feature-3.html").read_text()) == tokens((out / "feature-3.html").read_text())


@pytest.mark.parametrize(
    "args,message",
    [
        (["nope", "--features", "0-3"], "no SAE 'nope'"),
        (["bare", "--features", "0-3"], "no analysis yet"),
        (["web-sae", "--features", "0-64"], "out of range"),
        (["web-sae", "--features", "5-2"], "backwards"),
        (["web-sae", "--features", "../x"], "--features takes ranges"),
        (["web-sae", "--features", "1", "--analysis", "../x"], "no analysis '../x'"),
    ],
)
def test_export_dashboard_bad_input(web_lake, tmp_path, args, message):
    code, _, err = cli("export-dashboard", "--lake", web_lake["lake"], *args, "-o", str(tmp_path / "d"))
    assert code == 2 and message in err, err
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_slow_store_feature_list_loads_in_background(web_lake):
    """A MongoDB store that streams the scalars slowly: the SAE page says it is loading and refreshes
    instead of holding the request; then the list appears."""
    from saelake.analyze.web import WebApp, start_in_thread

    app = WebApp(web_lake["lake"], store=web_lake["store"], live=False)
    app.data.scalars_wait_s = 0.0
    srv, _ = start_in_thread(app, port=0)
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        status, _, body = get(base, "/sae/web-sae?analysis=web-sae-mongo")
        assert status == 200 and 'id="loading"' in body and 'http-equiv="refresh"' in body and "64 features" in body
        status, headers, _ = get(base, "/sae/web-sae/random?analysis=web-sae-mongo")
        assert status == 302 and re.search(r"/feature/\d+\?analysis=web-sae-mongo$", headers["Location"])
        deadline = time.time() + 20
        while time.time() < deadline:
            status, _, body = get(base, "/sae/web-sae?analysis=web-sae-mongo")
            if 'id="features"' in body:
                break
            time.sleep(0.2)
        assert 'id="loading"' not in body and body.count("<tr data-feature=") == 50
    finally:
        srv.shutdown()
        srv.server_close()
