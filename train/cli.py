"""``lake train | eval | export | import | plot`` and the SAE part of ``lake show``.

Registered through the ``saelake.commands`` / ``saelake.show`` entry points (pyproject.toml).
"""
from __future__ import annotations

import json
import os
from datetime import datetime

import click

from saelake.lake.cli import _lake_option, _split


def _fmt(v, spec=".4g"):
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


@click.command("train")
@_lake_option
@click.option("--config", "config_path", default=None, help="Sweep TOML: top-level defaults + one [[sae]] per SAE.")
@click.option("--run", "--run-name", "run", default=None, help="Snapshot source: run name.")
@click.option("--version", type=int, default=None, help="Snapshot version (default: the latest).")
@click.option("--live", is_flag=True, help="Run the model instead of reading a snapshot (needs --model/--dataset).")
@click.option("--model", default=None, help="Live: model (local folder or smollm2-135m).")
@click.option("--dataset", default=None, help="Live: corpus (file, folder, builtin).")
@click.option("--text-column", default=None)
@click.option("--context-size", type=int, default=None, help="Live: tokens per context (default 128).")
@click.option("--hook", default=None, help="Input hook(s); several (comma-separated) make a crosscoder.")
@click.option("--out-hook", default=None, help="Output hook(s) if different: a transcoder.")
@click.option("--arch", type=click.Choice(["topk", "batchtopk", "relu", "jumprelu"]), default="topk", show_default=True)
@click.option("--expansion", type=float, default=None, help="d_sae = expansion x d_in (default 8).")
@click.option("--d-sae", type=int, default=None)
@click.option("--k", type=int, default=None, help="TopK/BatchTopK: active latents per token (default 32).")
@click.option("--k-start", type=int, default=None, help="k annealing: start value.")
@click.option("--k-anneal", type=float, default=0.0, show_default=True, help="k annealing: fraction of the steps.")
@click.option("--l1", type=float, default=None, help="Sparsity coefficient (ReLU L1 default 5, JumpReLU L0 default 1).")
@click.option("--lr", type=float, default=None, help="Adam learning rate (default 2e-4/sqrt(d_sae/16384)).")
@click.option("--aux-k", type=int, default=None, help="AuxK latents (default d_in/2).")
@click.option("--dead-window", type=int, default=None, help="Tokens without activation => dead.")
@click.option("--decoder-norm-topk", is_flag=True, help="Select top-k by pre-activation x decoder norm.")
@click.option("--outlier-factor", type=float, default=10.0, show_default=True,
              help="Drop tokens with norm above this x the hook's median norm (0: keep all).")
@click.option("--normalize", type=click.Choice(["dataset", "none"]), default="dataset", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Weight initialisation seed.")
@click.option("--tokens", type=int, default=None, help="Training tokens.")
@click.option("--batch-size", type=int, default=None, help="Tokens per step (default 4096).")
@click.option("--repeat", is_flag=True, default=None, help="Loop over the snapshot when --tokens exceeds it.")
@click.option("--data-seed", type=int, default=None)
@click.option("--name", default=None, help="SAE name (sweep: name prefix).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--device", default=None, help="cpu or cuda (default cpu).")
@click.option("--autocast", type=click.Choice(["bf16"]), default=None, help="bf16 autocast for the encoder matmul.")
@click.option("--checkpoint-every", type=int, default=None, help="Steps between checkpoints (default: 5 per run).")
@click.option("--log-every", type=int, default=None, help="Steps between metric rows.")
@click.option("--stop-after", type=int, default=None, hidden=True, help="Stop at the first checkpoint >= this step.")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Relaunch under torchrun with N CPU processes (gloo); see --parallel.")
@click.option("--parallel", type=click.Choice(["data", "sweep"]), default=None,
              help="Under torchrun: data-parallel replicas (grads all-reduced) or a sweep's SAEs split across ranks "
                   "(default: sweep when there are at least as many SAEs as ranks).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(lake_uri, config_path, run, version, live, model, dataset, text_column, context_size, hook, out_hook,
              arch, expansion, d_sae, k, k_start, k_anneal, l1, lr, aux_k, dead_window, decoder_norm_topk,
              outlier_factor, normalize, seed, tokens, batch_size, repeat, data_seed, name, resume, device, autocast,
              checkpoint_every, log_every, stop_after, nproc, parallel, quiet):
    """Train one SAE, or a sweep of many (--config), from a snapshot or a live model."""
    from saelake.lake import UserError

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1:
        from saelake.lake.cli import _torchrun

        _torchrun(nproc)

    from .config import SAEConfig, SourceConfig, load_sweep
    from .trainer import Trainer

    source = dict(run=run, version=version, live=live or None, model=model, dataset=dataset, text_column=text_column,
                  context_size=context_size, tokens=tokens, batch_size=batch_size, repeat=repeat, data_seed=data_seed,
                  device=device, autocast=autocast, checkpoint_every=checkpoint_every, log_every=log_every,
                  parallel=parallel)
    if config_path:
        src, saes = load_sweep(config_path, lake_uri, {**source, "name": name})
    else:
        if not hook:
            raise UserError("--hook is required (or give a sweep file with --config)")
        if tokens is None:
            raise UserError("--tokens is required: how many tokens to train on")
        if expansion is not None and expansion <= 0:
            raise UserError(f"--expansion must be positive, got {expansion}")
        if d_sae is not None and d_sae <= 0:
            raise UserError(f"--d-sae must be positive, got {d_sae}")
        if name is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--name is required under torchrun (every rank must use the same name)")
        src = SourceConfig(lake=lake_uri, **{k_: v for k_, v in source.items() if v is not None})
        saes = [SAEConfig(hooks=_split(hook), out_hooks=_split(out_hook) if out_hook else None, arch=arch,
                          name=name or f"{arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}", expansion=expansion,
                          d_sae=d_sae, k=k, k_start=k_start, k_anneal=k_anneal, l1=l1, lr=lr, aux_k=aux_k,
                          dead_window=dead_window, decoder_norm_topk=decoder_norm_topk,
                          outlier_factor=outlier_factor or None, normalize=normalize, seed=seed)]
    trainer = Trainer(src, saes, resume=resume, progress=not quiet, stop_after=stop_after)
    results = trainer.run()
    trainer.comm.close()
    if trainer.parallel == "data" and trainer.comm.rank != 0:
        return  # the replicas are identical: rank 0 reports
    for cfg in results:
        if cfg["status"] != "complete":
            click.echo(f"sae {cfg['name']}: {cfg['status']} at step {cfg.get('step')} (checkpoint saved; "
                       "continue with --resume)")
            continue
        click.echo(f"sae {cfg['name']}: {cfg['arch']} d_sae {cfg['d_sae']}" + (f" k {cfg['k']}" if cfg['k'] else "")
                   + f", {cfg['tokens_trained']} tokens, FVU {_fmt(cfg['fvu'], '.4f')}, L0 {_fmt(cfg['l0'], '.1f')}, "
                   f"dead {_fmt(cfg['dead_fraction'], '.3f')}, {cfg['tokens_per_second']:.0f} tok/s")


@click.command("eval")
@_lake_option
@click.argument("name")
@click.option("--model", default=None, help="Model to splice into (default: the SAE's model).")
@click.option("--dataset", default=None, help="Corpus (default: the snapshot's contexts, else the run's corpus).")
@click.option("--tokens", type=int, default=16384, show_default=True, help="Evaluation tokens (whole contexts).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Contexts per forward pass.")
@click.option("--context-size", type=int, default=None, help="With --dataset (default: the run's).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(lake_uri, name, model, dataset, tokens, batch_size, context_size, device, as_json):
    """Reconstruction and downstream metrics with the SAE spliced into the model."""
    from .evaluate import evaluate

    res = evaluate(lake_uri, name, model=model, dataset=dataset, tokens=tokens, batch_size=batch_size,
                   context_size=context_size, device=device)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"sae {name} on {res['tokens']} tokens ({res['source']}; BOS positions excluded):")
    for key in ("fvu", "explained_variance", "l0", "dead_fraction", "ce_loss_recovered", "delta_lm_loss", "kl",
                "ce_clean", "ce_sae", "ce_zero_ablation"):
        if key in res:
            click.echo(f"  {key:20s} {_fmt(res[key])}")


@click.command("export")
@_lake_option
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["saelens"]), default="saelens", show_default=True)
@click.option("-o", "--out", required=True, help="Output directory.")
def export_cmd(lake_uri, name, fmt, out):
    """Write an SAE in the SAELens format (cfg.json + sae_weights.safetensors)."""
    from .interop import export_saelens

    export_saelens(lake_uri, name, out)
    click.echo(f"exported {name} to {out} (saelens: cfg.json, sae_weights.safetensors)")


@click.command("import")
@_lake_option
@click.argument("path")
@click.option("--format", "fmt", type=click.Choice(["saelens"]), default="saelens", show_default=True)
@click.option("--name", required=True, help="Name of the SAE in the lake.")
def import_cmd(lake_uri, path, fmt, name):
    """Read an SAE in the SAELens format into the lake (and the catalog)."""
    from .interop import import_saelens

    cfg = import_saelens(lake_uri, path, name)
    click.echo(f"imported {path} as {name}: {cfg['arch']} d_in {cfg['d_in']} d_sae {cfg['d_sae']}")


@click.command("plot")
@_lake_option
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
    from saelake.lake.storage import NAME_RE

    from .store import SAEStore

    store = SAEStore(lake)
    if not NAME_RE.match(name or "") or not store.exists(name):
        return False
    cfg = store.config(name)
    if as_json:
        click.echo(json.dumps(cfg, indent=2, default=str))
        return True
    click.echo(f"sae {cfg['name']}  [{cfg.get('status')}]  {cfg['arch']}")
    for key in ("hook", "out_hook", "d_in", "d_sae", "k", "run", "version", "model", "tokens_trained",
                "tokens_per_second", "bos_excluded", "outlier_factor", "created"):
        if cfg.get(key) is not None:
            click.echo(f"  {key:18s} {cfg[key]}")
    hp = cfg.get("hyperparameters") or {}
    click.echo("  hyperparameters    " + ", ".join(f"{k}={hp[k]}" for k in ("lr", "l1", "k_start", "k_anneal", "aux_k",
                                                                           "dead_window", "seed") if k in hp))
    fm = cfg.get("final_metrics") or {}
    click.echo(f"  final (training)   FVU {_fmt(cfg.get('fvu'))}, L0 {_fmt(cfg.get('l0'))}, dead fraction "
               f"{_fmt(cfg.get('dead_fraction'))} (window: {fm.get('window', '-')}; dead window "
               f"{fm.get('dead_window_tokens', '-')} tokens)")
    ev = cfg.get("eval")
    if ev:
        click.echo(f"  eval ({ev['tokens']} tokens, {ev['source']}): " + ", ".join(
            f"{k} {_fmt(ev.get(k))}" for k in ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "delta_lm_loss", "kl")
            if k in ev))
    return True
