"""The dictionary registry: every kind of sparse dictionary registers itself here by name.

    from saelake.train import dictionaries
    dictionaries.names()                      # ('relu', 'jumprelu', 'topk', 'batchtopk', ...)
    kind = dictionaries.get("topk")           # the class (a ``base.Dictionary``)
    sae = kind.build(d_in=576, d_sae=4608, k=32)

A kind is a ``Dictionary`` subclass in a module of this package, decorated with ``@register``;
every module here is imported on the registry's first use, so adding a kind is adding a module
(and its tests). What a kind implements: ``base.py``.
"""

from __future__ import annotations

import importlib
import pkgutil

from saelake.lake import UserError

from .base import Dictionary, Options, SAELensFormat, option

_KINDS: dict[str, type[Dictionary]] = {}
FIRST = ("sae", "topk")
_discovered = False


def register(kind: type[Dictionary]) -> type[Dictionary]:
    """Class decorator: make ``kind`` available under ``kind.name``."""
    if _KINDS.get(kind.name, kind) is not kind:
        raise ValueError(f"dictionary kind {kind.name!r} is registered twice ({_KINDS[kind.name]} and {kind})")
    _KINDS[kind.name] = kind
    return kind


def _discover() -> None:
    """Import every module of this package once (each registers its kinds). Done on first use, so
    that ``__path__`` may be extended before (tests add a kind from a temporary folder)."""
    global _discovered
    if not _discovered:
        _discovered = True
        # the SAE family (sae.py, topk.py) first: lists and messages name the classic kinds first
        for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name not in FIRST, m.name)):
            if module.name != "base":
                importlib.import_module(f"{__name__}.{module.name}")


def get(name: str) -> type[Dictionary]:
    """The kind called ``name``, or a UserError that lists the kinds."""
    _discover()
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown dictionary kind (arch) {name!r}: use one of {', '.join(_KINDS)}") from None


def names() -> tuple[str, ...]:
    _discover()
    return tuple(_KINDS)


def kinds() -> tuple[type[Dictionary], ...]:
    _discover()
    return tuple(_KINDS.values())


def from_saelens(architecture: str) -> type[Dictionary] | None:
    """The kind a SAELens ``architecture`` imports as (None: no kind reads it)."""
    _discover()
    return next((k for k in _KINDS.values() if architecture in k.saelens_imports), None)


__all__ = ["Dictionary", "Options", "SAELensFormat", "from_saelens", "get", "kinds", "names", "option", "register"]
