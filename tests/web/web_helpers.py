"""Helpers for the web tests (a module of its own: `from conftest import ...` picks whichever
conftest.py pytest imported first when the whole suite runs)."""
from __future__ import annotations

import contextlib
import io
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> tuple[int, str, str]:
    """The real `lake` entry point, in-process: (exit code, stdout, stderr)."""
    from lake.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()
