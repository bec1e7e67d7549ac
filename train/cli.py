"""``lake train | eval | export | import | plot`` and the SAE part of ``lake show``.

Registered through the ``saelake.commands`` / ``saelake.show`` entry points (pyproject.toml).
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime

import click

from saelake.lake.cli import lake_option, split_list

from . import dictionaries
from .config import (
    KIND_KEYS,
    NORMALIZE,
    BaseSAEConfig,
    SAEConfig,
    SourceConfig,
    common_key_help,
    int_list,
    kind_key_help,
    load_sweep,
)
from .evaluate import EVAL_BATCH, EVAL_TOKENS
from .holdout import HOLDOUT_HELP


def _fmt(v, spec=".4g"):
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def _source_help(text: str, key: str) -> str:
    default = next(f.default for f in dataclasses.fields(SourceConfig) if f.name == key)
    return f"{text} (default {default})."


def _sae_help(key: str) -> str:
    return common_key_help(key) + "."


def _kind_options(command):
    """One option per key of the registered dictionary kinds (help: which kinds have it, and each
    one's default), so that a new kind's keys appear here without editing this file."""
    types = {"int": int, "float": float, "str": str, "list[int]": IntList()}
    for key in reversed(list(KIND_KEYS)):
        base = KIND_KEYS[key]
        flag = "--" + key.replace("_", "-")
        if base == "bool":
            command = click.option(flag, is_flag=True, default=None, help=kind_key_help(key) + ".")(command)
        else:
            command = click.option(flag, type=types[base], default=None, help=kind_key_help(key) + ".")(command)
    return command


class IntList(click.ParamType):
    """P1,P2,... on the command line (a kind's ``list[int]`` key)."""

    name = "P1,P2,..."

    def convert(self, value, param, ctx):
        return value if isinstance(value, list) else int_list(value, f"--{param.name.replace('_', '-')}")


SOURCE_FLAGS = (
    "run",
    "version",
    "live",
    "model",
    "dataset",
    "text_column",
    "context_size",
    "tokens",
    "batch_size",
    "repeat",
    "data_seed",
    "holdout",
    "device",
    "autocast",
    "checkpoint_every",
    "log_every",
    "parallel",
)


@click.command("train")
@lake_option
@click.option("--config", "config_path", default=None, help="Sweep TOML: top-level defaults + one [[sae]] per SAE.")
@click.option("--run", "--run-name", "run", default=None, help="Snapshot source: run name.")
@click.option("--version", type=int, default=None, help="Snapshot version (default: the latest).")
@click.option(
    "--live", is_flag=True, default=None, help="Run the model instead of reading a snapshot (needs --model/--dataset)."
)
@click.option("--model", default=None, help="Live: model (local folder or smollm2-135m).")
@click.option("--dataset", default=None, help="Live: corpus (file, folder, builtin).")
@click.option("--text-column", default=None, help=_source_help("Live: the corpus' text column", "text_column"))
@click.option("--context-size", type=int, default=None, help=_source_help("Live: tokens per context", "context_size"))
@click.option(
    "--hook",
    default=None,
    help="Input hook(s); several (comma-separated) make a crosscoder; "
    "blocks.{0-5}.ln2.hook_out is a range; a:HOOK names a model of a run of several.",
)
@click.option("--out-hook", default=None, help="Output hook(s) if different: a transcoder (a CLT: one per input hook).")
@click.option("--arch", type=click.Choice(dictionaries.names()), default=None, help=_sae_help("arch"))
@click.option("--expansion", type=float, default=None, help=_sae_help("expansion"))
@click.option("--d-sae", type=int, default=None, help=_sae_help("d_sae"))
@click.option("--lr", type=float, default=None, help=_sae_help("lr"))
@click.option("--lr-warmup", type=float, default=None, help=_sae_help("lr_warmup"))
@click.option("--lr-decay", type=float, default=None, help=_sae_help("lr_decay"))
@click.option("--dead-window", type=int, default=None, help=_sae_help("dead_window"))
@click.option("--outlier-factor", type=float, default=None, help=_sae_help("outlier_factor"))
@click.option("--normalize", type=click.Choice(NORMALIZE), default=None, help=_sae_help("normalize"))
@click.option("--seed", type=int, default=None, help=_sae_help("seed"))
@_kind_options
@click.option("--tokens", type=int, default=None, help="Training tokens.")
@click.option("--batch-size", type=int, default=None, help=_source_help("Tokens per step", "batch_size"))
@click.option("--repeat", is_flag=True, default=None, help="Loop over the snapshot when --tokens exceeds it.")
@click.option("--data-seed", type=int, default=None, help=_source_help("Seed of the reader's order", "data_seed"))
@click.option("--holdout", type=int, default=None, help=HOLDOUT_HELP)
@click.option("--name", default=None, help="SAE name (sweep: name prefix).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--device", default=None, help=_source_help("cpu, cuda or cuda:N", "device"))
@click.option("--autocast", type=click.Choice(["bf16"]), default=None, help="bf16 autocast for the encoder matmul.")
@click.option("--checkpoint-every", type=int, default=None, help="Steps between checkpoints (default: 5 per run).")
@click.option("--log-every", type=int, default=None, help="Steps between metric rows (default: about 100 per run).")
@click.option("--stop-after", type=int, default=None, hidden=True, help="Stop at the first checkpoint >= this step.")
@click.option(
    "--nproc",
    type=int,
    default=1,
    show_default=True,
    help="Relaunch under torchrun with N CPU processes (gloo); see --parallel.",
)
@click.option(
    "--parallel",
    type=click.Choice(["data", "sweep"]),
    default=None,
    help="Under torchrun: data-parallel replicas (grads all-reduced) or a sweep's SAEs split across ranks "
    "(default: sweep when there are at least as many SAEs as ranks).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(lake_uri, config_path, hook, out_hook, name, resume, stop_after, nproc, quiet, **keys):
    """Train one SAE, or a sweep of many (--config), from a snapshot or a live model."""
    from saelake.lake import UserError

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1:
        from saelake.lake.cli import relaunch_under_torchrun

        relaunch_under_torchrun(nproc)

    from .trainer import Trainer

    source = {k: keys.pop(k) for k in SOURCE_FLAGS}
    sae_keys = {k: v for k, v in keys.items() if v is not None}  # the rest: SAE keys (None: not given)
    if config_path:
        if sae_keys:
            raise UserError(
                f"with --config, SAE settings go in the sweep file, not on the command line: "
                f"{', '.join('--' + k.replace('_', '-') for k in sae_keys)}"
            )
        src, saes = load_sweep(config_path, lake_uri, {**source, "name": name})
    else:
        if not hook:
            raise UserError("--hook is required (or give a sweep file with --config)")
        if source["tokens"] is None:
            raise UserError("--tokens is required: how many tokens to train on")
        for key in ("expansion", "d_sae"):
            if sae_keys.get(key) is not None and sae_keys[key] <= 0:
                raise UserError(f"--{key.replace('_', '-')} must be positive, got {sae_keys[key]}")
        arch = sae_keys.setdefault("arch", BaseSAEConfig.arch)
        own = {f.name for f in dataclasses.fields(dictionaries.get(arch).Options)}
        foreign = [k for k in sae_keys if k in KIND_KEYS and k not in own]
        if foreign:
            raise UserError(
                f"{', '.join('--' + k.replace('_', '-') for k in foreign)}: not an option of --arch "
                f"{arch} (its options: {', '.join('--' + k.replace('_', '-') for k in sorted(own))})"
            )
        if name is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--name is required under torchrun (every rank must use the same name)")
        src = SourceConfig(lake=lake_uri, **{k_: v for k_, v in source.items() if v is not None})
        saes = [
            SAEConfig(
                hooks=split_list(hook),
                out_hooks=split_list(out_hook) if out_hook else None,
                name=name or f"{arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}",
                **sae_keys,
            )
        ]
    trainer = Trainer(src, saes, resume=resume, progress=not quiet, stop_after=stop_after)
    results = trainer.run()
    trainer.comm.close()
    if trainer.parallel == "data" and trainer.comm.rank != 0:
        return  # the replicas are identical: rank 0 reports
    for cfg in results:
        if cfg["status"] != "complete":
            click.echo(
                f"sae {cfg['name']}: {cfg['status']} at step {cfg.get('step')} (checkpoint saved; "
                "continue with --resume)"
            )
            continue
        click.echo(
            f"sae {cfg['name']}: {cfg['arch']} d_sae {cfg['d_sae']}"
            + (f" k {cfg['k']}" if cfg["k"] else "")
            + f", {cfg['tokens_trained']} tokens, {_heldout_summary(cfg)}; train FVU (in-sample) "
            f"{_fmt(cfg['fvu'], '.4f')}, L0 {_fmt(cfg['l0'], '.1f')}, dead {_fmt(cfg['dead_fraction'], '.3f')}; "
            f"{cfg['tokens_per_second']:.0f} tok/s"
        )


def _heldout_summary(cfg: dict) -> str:
    h = cfg.get("holdout") or {}
    if not h.get("tokens_evaluated"):
        return "no held-out tokens (--holdout 0)" if "holdout" in cfg else "no held-out metrics (older SAE)"
    return (
        f"held-out ({h['tokens_evaluated']} tokens) FVU {_fmt(h.get('fvu'), '.4f')}, "
        f"L0 {_fmt(h.get('l0'), '.1f')}, dead {_fmt(h.get('dead_fraction'), '.3f')}"
    )


@click.command("eval")
@lake_option
@click.argument("name")
@click.option("--model", default=None, help="Model to splice into (default: the SAE's model).")
@click.option("--dataset", default=None, help="Corpus (default: the snapshot's contexts, else the run's corpus).")
@click.option("--tokens", type=int, default=EVAL_TOKENS, show_default=True, help="Evaluation tokens (whole contexts).")
@click.option("--batch-size", type=int, default=EVAL_BATCH, show_default=True, help="Contexts per forward pass.")
@click.option("--context-size", type=int, default=None, help="With --dataset (default: the run's).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(lake_uri, name, model, dataset, tokens, batch_size, context_size, device, as_json):
    """Reconstruction and downstream metrics with the SAE spliced into the model."""
    from .evaluate import evaluate

    res = evaluate(
        lake_uri,
        name,
        model=model,
        dataset=dataset,
        tokens=tokens,
        batch_size=batch_size,
        context_size=context_size,
        device=device,
    )
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"sae {name} on {res['tokens']} tokens ({res['source']}; BOS positions excluded):")
    for key in (
        "fvu",
        "explained_variance",
        "l0",
        "dead_fraction",
        "ce_loss_recovered",
        "delta_lm_loss",
        "kl",
        "ce_clean",
        "ce_sae",
        "ce_zero_ablation",
    ):
        if key in res:
            click.echo(f"  {key:20s} {_fmt(res[key])}")


@click.command("export")
@lake_option
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["saelens"]), default="saelens", show_default=True)
@click.option("-o", "--out", required=True, help="Output folder: new or empty (see --force).")
@click.option("--force", is_flag=True, help="Export into a non-empty folder (replaces the SAELens files there).")
def export_cmd(lake_uri, name, fmt, out, force):
    """Write an SAE in the SAELens format (cfg.json + sae_weights.safetensors)."""
    from .interop import export_saelens

    export_saelens(lake_uri, name, out, force=force)
    click.echo(f"exported {name} to {out} (saelens: cfg.json, sae_weights.safetensors)")


@click.command("import")
@lake_option
@click.argument("source")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "saelens", "sparsify", "llamascopium"]),
    default="auto",
    show_default=True,
    help="The source's format (auto: from the files in the folder).",
)
@click.option("--name", required=True, help="Name of the SAE in the lake.")
@click.option("--hook", default=None, help="Input hook (TransformerLens name) when the source's own name is not one.")
@click.option("--out-hook", default=None, help="Output hook of a transcoder, when the source does not say.")
@click.option("--model", default=None, help="Model the dictionary belongs to (default: what the source says).")
@click.option(
    "--norm-scaling-factor",
    type=float,
    default=None,
    help="SAELens expected_average_only_in: the factor its inputs were scaled by (folded in).",
)
def import_cmd(lake_uri, source, fmt, name, hook, out_hook, model, norm_scaling_factor):
    """Read a dictionary into the lake: a SAELens, sparsify or Llamascopium folder, or one on the Hugging
    Face hub as hf://ORG/REPO[/SUBFOLDER][@REVISION] (HF_HUB_OFFLINE: from the cache only)."""
    from .interop import import_dictionary

    cfg = import_dictionary(
        lake_uri, source, name, fmt, norm_scaling_factor=norm_scaling_factor, hook=hook, out_hook=out_hook, model=model
    )
    hooks = cfg["hook"] + (f" -> {cfg['out_hook']}" if cfg["out_hook"] != cfg["hook"] else "")
    folded = (cfg.get("normalization") or {}).get("method", "none")
    click.echo(
        f"imported {source} ({cfg['import_format']}) as {name}: {cfg['arch']} d_in {cfg['d_in']} d_sae "
        f"{cfg['d_sae']} at {hooks}" + (f"; folded {folded}" if folded != "none" else "")
    )


@click.command("plot")
@lake_option
@click.argument("names", nargs=-1, required=True)
@click.option("--pareto", is_flag=True, help="FVU (and CE loss recovered) against L0 for these SAEs.")
@click.option("-o", "--out", required=True, help="Output image (png, pdf, svg).")
def plot_cmd(lake_uri, names, pareto, out):
    """Training curves of an SAE, or a Pareto plot of several."""
    from .plot import plot_curves, plot_pareto

    if pareto:
        plot_pareto(lake_uri, list(names), out)
    else:
        if len(names) != 1:
            from saelake.lake import UserError

            raise UserError("lake plot draws the curves of one SAE; for several use --pareto")
        plot_curves(lake_uri, names[0], out)
    click.echo(f"wrote {out}")


def show_sae(lake, name: str, as_json: bool) -> bool:
    """`lake show NAME` for SAEs: config and final metrics."""
    from saelake.lake.heartbeat import shown_status
    from saelake.lake.storage import NAME_RE

    from .store import SAEStore

    store = SAEStore(lake)
    if not NAME_RE.match(name or "") or not store.exists(name):
        return False
    cfg = store.config(name)
    if as_json:
        click.echo(json.dumps(cfg, indent=2, default=str))
        return True
    click.echo(f"sae {cfg['name']}  [{shown_status(cfg)}]  {cfg['arch']}")
    for key in (
        "hook",
        "out_hook",
        "d_in",
        "d_sae",
        "k",
        "run",
        "version",
        "model",
        "tokens_trained",
        "tokens_per_second",
        "bos_excluded",
        "outlier_factor",
        "created",
        "imported_from",
        "import_format",
    ):
        if cfg.get(key) is not None:
            click.echo(f"  {key:18s} {cfg[key]}")
    hp = cfg.get("hyperparameters") or {}
    click.echo(
        "  hyperparameters    "
        + ", ".join(
            f"{k}={hp[k]}" for k in ("lr", "l1", "k_start", "k_anneal", "aux_k", "dead_window", "seed") if k in hp
        )
    )
    fm = cfg.get("final_metrics") or {}
    if cfg.get("status") == "complete":
        click.echo(f"  {_heldout_summary(cfg)} ({(cfg.get('holdout') or {}).get('rule', '-')})")
    click.echo(
        f"  train (in-sample)  FVU {_fmt(cfg.get('fvu'))}, L0 {_fmt(cfg.get('l0'))}, dead fraction "
        f"{_fmt(cfg.get('dead_fraction'))} (window: {fm.get('window', '-')}; dead window "
        f"{fm.get('dead_window_tokens', '-')} tokens)"
    )
    ev = cfg.get("eval")
    if ev:
        click.echo(
            f"  eval ({ev['tokens']} tokens, {ev['source']}): "
            + ", ".join(
                f"{k} {_fmt(ev.get(k))}"
                for k in ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "delta_lm_loss", "kl")
                if k in ev
            )
        )
    return True
