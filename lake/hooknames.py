"""Hook names as users write them: ``{a-b}`` layer ranges, and ``model:hook`` in runs of several models.

``blocks.{0-2}.ln2.hook_out`` stands for blocks.0..., blocks.1..., blocks.2... (one range per name).
A run of several models (``--model a=PATH,b=PATH``, or paths whose folder names become the model
names) stores every hook once per model, as ``a:blocks.3.hook_resid_post``; a hook given without a
model applies to each model.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

HOOK_RANGE = re.compile(r"\{(\d+)-(\d+)\}")
MODEL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def expand_hooks(hooks: list[str]) -> list[str]:
    """``{a-b}`` ranges expanded, in order."""
    out = []
    for h in hooks:
        ranges = HOOK_RANGE.findall(h)
        if not ranges:
            out.append(h)
            continue
        a, b = (int(v) for v in ranges[0])
        if len(ranges) > 1 or a > b:
            raise UserError(f"hook {h!r}: a name holds one range {{a-b}} with a <= b")
        out += [HOOK_RANGE.sub(str(i), h) for i in range(a, b + 1)]
    return out


def parse_models(spec: str) -> list[tuple[str, str]]:
    """``a=PATH,b=PATH`` (or ``PATH,PATH``: named by their last path part) -> [(name, spec)]."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, path = part.partition("=") if "=" in part else (Path(part.rstrip("/")).name, "", part)
        if not MODEL_NAME.match(name):
            raise UserError(
                f"model name {name!r} (of {part!r}): use letters, digits, - and _; name models with "
                "--model a=PATH,b=PATH"
            )
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UserError(
            f"two models are both called {next(n for n in names if names.count(n) > 1)!r}: name them "
            "with --model a=PATH,b=PATH"
        )
    return out


def several_models(spec: str) -> bool:
    return "," in spec


def qualify(spec: str, hooks: list[str]) -> list[str]:
    """The hooks of a run of several models as stored (``model:hook``): a hook without a model once per
    model, model-major; one run of one model keeps its hooks as they are."""
    hooks = expand_hooks(hooks)
    if not several_models(spec):
        return hooks
    names = [n for n, _ in parse_models(spec)]
    out = []
    for name in names:
        for h in hooks:
            model, sep, bare = h.partition(":")
            if sep and model not in names:
                raise UserError(f"hook {h!r}: no model {model!r} in this run (its models: {', '.join(names)})")
            if not sep or model == name:
                out.append(h if sep else f"{name}:{h}")
    return list(dict.fromkeys(out))
