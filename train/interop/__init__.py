"""Dictionaries in and out of other tools' formats, one format per module:

- ``saelens``: SAELens folders (``cfg.json`` + ``sae_weights.safetensors``), import and export;
- ``sparsify``: EleutherAI sparsify checkpoints (a folder per hookpoint: ``cfg.json`` + ``sae.safetensors``);
- ``llamascopium``: OpenMOSS Language-Model-SAEs / Llamascopium (``config.json`` + ``sae_weights.safetensors``);
- ``hub``: any of these on the Hugging Face hub, as ``hf://ORG/REPO[/SUBFOLDER][@REVISION]``.

Every import folds the source's input scaling into the weights (the imported dictionary takes raw
activations, like a trained one) and registers the result like a trained SAE (``common.register``).
"""

from __future__ import annotations

from pathlib import Path

from saelake.lake import Lake, UserError

from . import hub
from .common import Imported, register
from .llamascopium import is_llamascopium, read_llamascopium
from .saelens import export_saelens, is_saelens, read_saelens
from .sparsify import hookpoints, is_sparsify, read_sparsify

FORMATS = ("saelens", "sparsify", "llamascopium")
_DETECT = {"saelens": is_saelens, "sparsify": is_sparsify, "llamascopium": is_llamascopium}


def detect(path: Path) -> str:
    """The format of a dictionary folder, or one line saying what the folder lacks."""
    found = [f for f in FORMATS if _DETECT[f](path)]
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"{path} looks like {' and '.join(found)} at once: pass --format")
    subs = hookpoints(path)
    if subs:
        raise UserError(
            f"{path} holds sparsify coders for several hookpoints ({', '.join(subs[:8])}"
            f"{', ...' if len(subs) > 8 else ''}): import one folder, e.g. {path / subs[0]}"
        )
    raise UserError(
        f"{path} is not a dictionary folder saelake reads: SAELens needs cfg.json and "
        "sae_weights.safetensors, sparsify cfg.json and sae.safetensors, Llamascopium config.json and "
        "sae_weights.safetensors"
    )


def read(
    source: str | Path,
    fmt: str = "auto",
    *,
    norm_scaling_factor: float | None = None,
    hook: str | None = None,
    out_hook: str | None = None,
) -> tuple[Imported, str]:
    """(the dictionary at ``source``, a local folder or an hf:// address; where it came from)."""
    if fmt not in ("auto",) + FORMATS:
        raise UserError(f"unknown format {fmt!r}: use auto or one of {', '.join(FORMATS)}")
    if hub.is_hub(str(source)):
        path, origin = hub.fetch(str(source))
    else:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise UserError(
                f"{path} is not a folder"
                + (" (it does not exist)" if not path.exists() else "")
                + ": give a dictionary folder or hf://ORG/REPO[/SUBFOLDER][@REVISION]"
            )
        origin = str(path.resolve())
    fmt = detect(path) if fmt == "auto" else fmt
    if fmt != "auto" and not _DETECT[fmt](path):
        raise UserError(f"{path} is not a {fmt} folder")
    if norm_scaling_factor is not None and fmt != "saelens":
        raise UserError("--norm-scaling-factor is for SAELens folders (expected_average_only_in)")
    if fmt == "saelens":
        imp = read_saelens(path, norm_scaling_factor=norm_scaling_factor, hook=hook, out_hook=out_hook)
    elif fmt == "sparsify":
        imp = read_sparsify(path, hook=hook, out_hook=out_hook)
    else:
        imp = read_llamascopium(path, hook=hook, out_hook=out_hook)
    return imp, origin


def import_dictionary(
    lake: Lake | str,
    source: str | Path,
    name: str,
    fmt: str = "auto",
    *,
    norm_scaling_factor: float | None = None,
    hook: str | None = None,
    out_hook: str | None = None,
    model: str | None = None,
) -> dict:
    """Read a dictionary from ``source`` and save it in the lake as SAE ``name``; returns its config."""
    from saelake.lake.storage import check_name

    from ..store import SAEStore

    check_name(name, "SAE name")
    if SAEStore(lake).exists(name):  # before any download
        raise UserError(f"SAE name {name!r} is taken in {SAEStore(lake).lake.root}: pick another --name")
    imp, origin = read(source, fmt, norm_scaling_factor=norm_scaling_factor, hook=hook, out_hook=out_hook)
    if model:
        imp.model = model
    return register(lake, imp, name, origin)


def import_saelens(lake: Lake | str, path: str | Path, name: str) -> dict:
    """A SAELens folder as SAE ``name`` (``import_dictionary`` with format saelens)."""
    return import_dictionary(lake, path, name, "saelens")


__all__ = [
    "FORMATS",
    "Imported",
    "detect",
    "export_saelens",
    "hub",
    "import_dictionary",
    "import_saelens",
    "read",
    "register",
]
