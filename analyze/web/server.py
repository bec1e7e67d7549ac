"""``lake serve``: a standard-library HTTP server (ThreadingHTTPServer) over ``WebApp``.

``WebApp.handle(method, path, query, body)`` is the whole application (routing, pages, JSON) and
returns ``(status, content_type, body_bytes, headers)``; the server only moves bytes. Routes:

    /                              lake: runs, snapshots, SAEs, analyses
    /run/<run>                     one run: manifest, snapshots, hook statistics
    /sae/<sae>[?analysis=A&dmin=&dmax=&amin=&amax=&sort=&desc=&page=]
                                   SAE: hyper-parameters, curves, density histogram, feature list
    /sae/<sae>/feature/<i>[?analysis=A]   one feature
    /sae/<sae>/random[?analysis=A]        302 to a random (live) feature
    /sae/<sae>/live                live inference: top features per token
    POST /api/live                 {"sae", "text", "feature"?, "top"?, "analysis"?} -> tokens + activations
                                   (+ the short label of each feature shown) (JSON)
    GET  /api/live/status?sae=S    {"model", "loaded"}: whether the first live call will load the model
    GET  /api/context?sae=S&analysis=A&feature=F&context=C
                                   {"html"}: the whole context C of a sample of feature F (the "…")
    POST /api/note                 {"sae", "analysis", "feature", "note"}: set a feature's note
    POST /api/steer                {"sae", "prompt", "feature", "value", "mode"?, "tokens"?} -> lake steer's answer
                                   (JSON only, same origin only: a page elsewhere cannot post one)

No route serves files: names in URLs are looked up in the lake's listings after ``check_name``.
"""

from __future__ import annotations

import errno
import json
import random
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

from saelake.lake import UserError

from .data import LakeData, Loading, NotFound, StoreDown, shown
from .live import LiveEncoder, LiveError
from .pages import Renderer

MAX_BODY = 64 * 1024
HTML = "text/html; charset=utf-8"
JSON = "application/json"


class WebApp:
    def __init__(self, lake_uri: str, store: str | None = None, model: str | None = None, live: bool = True):
        self.data = LakeData(lake_uri, store=store, model=model)
        self.live = LiveEncoder(self.data) if live else None
        self.pages = Renderer(self.data, live=live)

    # -- dispatch --------------------------------------------------------------------------------
    def handle(
        self, method: str, raw_path: str, body: bytes = b"", headers: dict | None = None
    ) -> tuple[int, str, bytes, dict]:
        path, _, qs = raw_path.partition("#")[0].partition("?")  # (not urlsplit: "//x" is no host here)
        query = {k: v[-1] for k, v in parse_qs(qs, keep_blank_values=True).items()}
        segs = [unquote(s) for s in path.split("/") if s]
        try:
            if method == "POST" and segs == ["api", "live"]:
                return self._live(body)
            if method == "POST" and segs == ["api", "steer"]:
                return self._steer(body)
            if method == "POST" and segs == ["api", "note"]:
                return self._note(body, headers or {})
            if segs[:1] == ["api"] and method in ("GET", "HEAD"):
                return self._api_get(segs, query)
            if method not in ("GET", "HEAD"):
                return self._json(405, {"error": f"{method} is not allowed here"})
            return self._page(segs, query, path)
        except NotFound as e:
            if segs[:1] == ["api"]:
                return self._json(404, {"error": str(e)})
            return self._html(404, self.pages.error_page(404, str(e)))
        except StoreDown as e:
            if segs[:1] == ["api"]:
                return self._json(503, {"error": str(e)})
            return self._html(503, self.pages.error_page(503, str(e)))
        except UserError as e:
            if segs[:1] == ["api"]:
                return self._json(400, {"error": str(e)})
            return self._html(400, self.pages.error_page(400, str(e)))
        except Exception as e:  # a bug: say so, keep serving
            traceback.print_exc()
            return self._html(500, self.pages.error_page(500, f"internal error ({type(e).__name__}): {e}"))

    def _page(self, segs: list[str], query: dict, path: str):
        p = self.pages
        analysis = query.get("analysis") or None
        if not segs:
            return self._html(200, p.lake_page())
        if segs[0] == "favicon.ico" and len(segs) == 1:
            return 204, "image/x-icon", b"", {}
        if segs[0] == "run" and len(segs) == 2:
            return self._html(200, p.run_page(segs[1]))
        if segs[0] == "sae" and len(segs) >= 2:
            sae = segs[1]
            if len(segs) == 2:
                return self._html(200, p.sae_page(sae, query, analysis))
            if len(segs) == 4 and segs[2] == "feature":
                return self._html(200, p.feature_page(sae, self._index(sae, segs[3]), analysis))
            if len(segs) == 3 and segs[2] == "random":
                return self._random(sae, analysis)
            if len(segs) == 3 and segs[2] == "live":
                return self._html(200, p.live_page(sae, analysis))
        raise NotFound(f"no page {shown(path)!r}")

    @staticmethod
    def _index(sae: str, s: str) -> int:
        if not s.isascii() or not s.isdigit() or len(s) > 9:
            raise NotFound(f"no feature {shown(s)!r} in SAE {shown(sae)!r}: feature ids are numbers")
        return int(s)

    def _random(self, sae: str, analysis: str | None):
        self.data.sae(sae)
        rec = self.data.analysis_for(sae, analysis)
        if rec is None:
            raise NotFound(f"SAE {sae!r} has no analysis yet (run `lake analyze {sae}`)")
        try:
            sc = self.data.scalars(rec, wait_s=1.0)
            alive = sc.feature[sc.count > 0]
            pool = alive if len(alive) else sc.feature
            index = int(random.choice(pool.tolist())) if len(pool) else 0
        except Loading:  # not loaded yet: any feature
            index = random.randrange(max(1, int(rec.get("n_features") or 1)))
        return 302, HTML, b"", {"Location": self.pages.links.feature(sae, index, rec["name"])}

    def _api_get(self, segs: list[str], query: dict):
        if segs == ["api", "live", "status"]:
            if self.live is None:
                return self._json(503, {"error": "live inference is off (lake serve --no-live)"})
            cfg = self.data.sae(query.get("sae") or "")
            spec = self.live.model_spec(cfg)
            return self._json(200, {"model": spec, "loaded": self.live.is_loaded(spec)})
        if segs == ["api", "context"]:
            sae = query.get("sae") or ""
            self.data.sae(sae)
            index = self._index(sae, query.get("feature") or "")
            ctx = query.get("context") or ""
            if not ctx.isascii() or not ctx.isdigit() or len(ctx) > 18:
                raise NotFound(f"no context {shown(ctx)!r}: context ids are numbers")
            html = self.pages.context_html(sae, query.get("analysis") or None, index, int(ctx))
            return self._json(200, {"html": html})
        raise NotFound(f"no API {shown('/'.join(segs))!r}")

    def _note(self, body: bytes, headers: dict):
        """A feature's note. JSON only and, when the browser says where the page came from, only
        from this server's own pages: a form on another site cannot write into the store."""
        h = {k.lower(): v for k, v in headers.items()}
        if not (h.get("content-type") or "").startswith("application/json"):
            return self._json(415, {"error": "send JSON (Content-Type: application/json)"})
        origin, host = h.get("origin"), h.get("host")
        if origin and (not host or origin.split("://", 1)[-1] != host):
            return self._json(403, {"error": "notes are written from this server's own pages only"})
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            return self._json(400, {"error": 'send a JSON object: {"sae", "feature", "note"}'})
        feature = req.get("feature")
        if isinstance(feature, bool) or not isinstance(feature, int):
            return self._json(400, {"error": "feature must be an integer"})
        analysis, sae = req.get("analysis"), str(req.get("sae") or "")
        if analysis is not None and not isinstance(analysis, str):
            return self._json(400, {"error": "analysis must be a string"})
        self.data.sae(sae)
        rec = self.data.analysis_for(sae, analysis or None)
        if rec is None:
            raise NotFound(f"SAE {sae!r} has no analysis yet (run `lake analyze {sae}`)")
        self.data.set_note(rec, feature, req.get("note"))
        return self._json(200, {"ok": True, "feature": feature, "analysis": rec["name"]})

    def _live(self, body: bytes):
        if self.live is None:
            return self._json(503, {"error": "live inference is off (lake serve --no-live)"})
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            return self._json(400, {"error": 'send a JSON object: {"sae": ..., "text": ...}'})
        feature = req.get("feature")
        if feature is not None and (isinstance(feature, bool) or not isinstance(feature, int)):
            return self._json(400, {"error": "feature must be an integer"})
        top = req.get("top", 5)
        if isinstance(top, bool) or not isinstance(top, int):
            return self._json(400, {"error": "top must be an integer"})
        try:
            t0 = time.perf_counter()
            out = self.live.run(str(req.get("sae") or ""), req.get("text"), feature, top)
            out["ms"] = round(1000 * (time.perf_counter() - t0), 1)
        except NotFound as e:
            return self._json(404, {"error": str(e)})
        except LiveError as e:
            return self._json(e.status, {"error": str(e)})
        out["labels"] = self._live_labels(out, req.get("analysis"))
        return self._json(200, out)

    def _steer(self, body: bytes):
        if self.live is None:
            return self._json(503, {"error": "live inference is off (lake serve --no-live)"})
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            return self._json(400, {"error": 'send a JSON object: {"sae", "prompt", "feature", "value"}'})
        try:
            return self._json(200, self.live.steer(str(req.get("sae") or ""), req))
        except NotFound as e:
            return self._json(404, {"error": str(e)})
        except LiveError as e:
            return self._json(e.status, {"error": str(e)})

    def _live_labels(self, out: dict, analysis) -> dict:
        """Short labels of the features a live answer shows (none without an analysis)."""
        try:
            rec = self.data.analysis_for(out["sae"], analysis if isinstance(analysis, str) and analysis else None)
            if rec is None:
                return {}
            feats = {out["feature"]} if "feature" in out else {f for row in out["top"] for f, _ in row}
            return {str(f): v["label"] for f, v in self.data.labels(rec, sorted(feats), wait_s=0.5).items()}
        except (NotFound, StoreDown, UserError):
            return {}

    @staticmethod
    def _html(status: int, html: str):
        return status, HTML, html.encode("utf-8"), {}

    @staticmethod
    def _json(status: int, obj):
        return status, JSON, json.dumps(obj).encode(), {}


class Handler(BaseHTTPRequestHandler):
    app: WebApp
    quiet = False
    server_version = "saelake"
    protocol_version = "HTTP/1.1"

    def _respond(self, method: str, body: bytes = b""):
        t0 = time.perf_counter()
        status, ctype, data, headers = self.app.handle(method, self.path, body, dict(self.headers.items()))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Server-Timing", f"app;dur={1000 * (time.perf_counter() - t0):.1f}")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def do_GET(self):
        self._respond("GET")

    def do_HEAD(self):
        self._respond("HEAD")

    def do_POST(self):
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
            return
        self._respond("POST", self.rfile.read(n))

    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write(f"{self.address_string()} - {fmt % args}\n")


class Server(ThreadingHTTPServer):
    daemon_threads = True  # SO_REUSEADDR (the default) still refuses a port another server listens on

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the browser went elsewhere before the page was sent: nothing to report
        super().handle_error(request, client_address)


def make_server(app: WebApp, host: str = "127.0.0.1", port: int = 8765, quiet: bool = False) -> Server:
    handler = type("BoundHandler", (Handler,), {"app": app, "quiet": quiet})
    try:
        return Server((host, port), handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is already in use: stop the other server or pass --port N"
            ) from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def start_in_thread(app: WebApp, host: str = "127.0.0.1", port: int = 0) -> tuple[Server, threading.Thread]:
    """For tests and notebooks: serve in a daemon thread; ``server.shutdown()`` stops it."""
    server = make_server(app, host, port, quiet=True)
    t = threading.Thread(target=server.serve_forever, name="saelake-web", daemon=True)
    t.start()
    return server, t
