"""Helpers for the web tests (a module of its own: `from conftest import ...` picks whichever
conftest.py pytest imported first when the whole suite runs)."""

from __future__ import annotations

import http.client

from tests.conftest import cli, free_port  # noqa: F401  (re-exported to the web tests)


def get(url_base: str, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    host, port = url_base.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.putrequest(method, path, skip_accept_encoding=True)  # the path goes out exactly as written
    for k, v in (headers or {}).items():
        c.putheader(k, v)
    if body is not None:
        c.putheader("Content-Length", str(len(body)))
    c.endheaders()
    if body is not None:
        c.send(body)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data.decode("utf-8", "replace")
