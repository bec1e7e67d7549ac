"""Helpers for the web tests (a module of its own: `from conftest import ...` picks whichever
conftest.py pytest imported first when the whole suite runs)."""
from __future__ import annotations

from tests.conftest import cli, free_port  # noqa: F401  (re-exported to the web tests)
