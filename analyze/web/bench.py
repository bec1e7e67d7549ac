"""Page load times of the web UI on a real lake: ``python -m analyze.web.bench --lake L --sae S``.

Starts the app in a thread on a free port and times, for random features, the HTTP response
(server) and, with --browser, the full load in headless Chromium (navigation to the load event).
The first request of an analysis pays for opening the Lance table / MongoDB connection and
loading the scalars; it is reported separately ("cold").
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from .server import WebApp, start_in_thread


def _get(url: str) -> tuple[float, int]:
    import urllib.error

    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            n = len(r.read())
    except urllib.error.HTTPError as e:
        print(f"  HTTP {e.code} for {url}")
        n = len(e.read())
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lake", required=True)
    p.add_argument("--sae", required=True)
    p.add_argument("--analysis", default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--n", type=int, default=20, help="random features to time")
    p.add_argument("--browser", action="store_true", help="also time full loads in /usr/bin/chromium")
    a = p.parse_args(argv)

    app = WebApp(a.lake, store=a.store, live=False)
    srv, _ = start_in_thread(app, port=0)
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    rec = app.data.analysis_for(a.sae, a.analysis)
    q = f"?analysis={rec['name']}"
    n = int(rec["n_features"])
    rng = random.Random(0)
    feats = [rng.randrange(n) for _ in range(a.n)]
    print(f"SAE {a.sae}: {n} features, analysis {rec['name']} ({rec['store']})")
    cold, size = _get(f"{base}/sae/{a.sae}/feature/{feats[0]}{q}")
    print(f"feature page, cold (opens the table): {1000 * cold:.0f} ms, {size / 1024:.0f} KB")
    times = [_get(f"{base}/sae/{a.sae}/feature/{f}{q}")[0] for f in feats]
    print(
        f"feature page, HTTP: median {1000 * statistics.median(times):.0f} ms, max {1000 * max(times):.0f} ms "
        f"over {len(times)} random features"
    )
    t, size = _get(f"{base}/sae/{a.sae}{q}")
    print(f"SAE page, first (loads {n} scalars): {1000 * t:.0f} ms, {size / 1024:.0f} KB")
    t, _ = _get(f"{base}/sae/{a.sae}{q}&sort=density&desc=1&page=7&dmin=1e-4")
    print(f"SAE page, filtered/sorted page 7: {1000 * t:.0f} ms")
    t, _ = _get(f"{base}/")
    print(f"lake page: {1000 * t:.0f} ms")
    if a.browser:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            b = pw.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/sae/{a.sae}/feature/{feats[0]}{q}")  # warm the browser
            loads = []
            for f in feats:
                t0 = time.perf_counter()
                page.goto(f"{base}/sae/{a.sae}/feature/{f}{q}", wait_until="load")
                loads.append(time.perf_counter() - t0)
            print(
                f"feature page in Chromium (navigation to load event): median "
                f"{1000 * statistics.median(loads):.0f} ms, max {1000 * max(loads):.0f} ms"
            )
            b.close()
    srv.shutdown()


if __name__ == "__main__":
    main()
