"""The ``lake`` command. train/ and analyze/ add sub-commands through the
``saelake.commands`` entry-point group, so this module never imports upward."""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points

import click

from .errors import UserError


def lake_option(f):
    return click.option(
        "--lake",
        "lake_uri",
        envvar="SAELAKE_LAKE",
        required=True,
        help="Lake root: a directory or s3://bucket/prefix (env SAELAKE_LAKE).",
    )(f)


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _table(columns: list[str], rows: list[tuple]) -> str:
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [min(60, max(len(r[i]) for r in cells)) for i in range(len(columns))]
    return "\n".join("  ".join(c[:60].ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


@click.group()
@click.version_option(package_name="saelake")
def cli():
    """saelake: an activation lake, SAE trainers and analyzers."""


@cli.command()
@lake_option
@click.option(
    "--model",
    default="smollm2-135m",
    show_default=True,
    help="Local HF folder, bundled smollm2-135m, or a hub name; several (a=PATH,b=PATH) run the same tokens "
    "through each (one tokenizer), their hooks stored as a:HOOK, b:HOOK.",
)
@click.option(
    "--dataset",
    default="builtin",
    show_default=True,
    help="Local file/folder (txt, jsonl, json, parquet, csv), builtin[:pydoc|stdlib|fortunes], or hub name.",
)
@click.option("--text-column", default="text", show_default=True)
@click.option(
    "--hooks",
    required=True,
    help="Comma-separated TransformerLens hook names; blocks.{0-5}.ln2.hook_out "
    "is a range; with several models a hook applies to each (or name one: a:HOOK).",
)
@click.option("--tokens", type=int, required=True, help="Tokens to ingest (rounded up to whole contexts).")
@click.option("--context-size", type=int, default=128, show_default=True)
@click.option("--layout", default="1d,2d", show_default=True, help="1d (shuffled tokens), 2d (contexts), or both.")
@click.option(
    "--dtype",
    default="float16",
    show_default=True,
    help="Storage codec: float16, bfloat16, float32, int8 (a float16 scale per token and 64 channels: "
    "0.52x float16's bytes) or float8 (e4m3, a scale per token); readers always decode.",
)
@click.option(
    "--run",
    "--run-name",
    "run",
    default=None,
    help="Run name (default: run-<timestamp>); spell it --run-name under torchrun.",
)
@click.option("--batch-size", type=int, default=16, show_default=True, help="Contexts per forward pass.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--shuffle-buffer",
    type=int,
    default=16384,
    show_default=True,
    help="Tokens per chunk: the 1d shuffle window and the commit unit.",
)
@click.option("--keep-bos", is_flag=True, help="Keep BOS positions in the 1d table.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run (same settings).")
@click.option("--append", is_flag=True, help="Extend a complete run by --tokens as a new snapshot version.")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--nproc",
    type=int,
    default=1,
    show_default=True,
    help="Processes on this machine (launches torchrun; each takes a share of the chunks).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def ingest(
    lake_uri,
    model,
    dataset,
    text_column,
    hooks,
    tokens,
    context_size,
    layout,
    dtype,
    run,
    batch_size,
    seed,
    shuffle_buffer,
    keep_bos,
    resume,
    append,
    device,
    nproc,
    quiet,
):
    """Run a model over a corpus; write 1d/2d activations to the lake."""
    from .ingest import IngestConfig
    from .ingest import ingest as run_ingest

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1:
        relaunch_under_torchrun(nproc)

    cfg = IngestConfig(
        lake=lake_uri,
        model=model,
        dataset=dataset,
        text_column=text_column,
        hooks=split_list(hooks),
        tokens=tokens,
        context_size=context_size,
        layouts=split_list(layout),
        dtype=dtype,
        run=run,
        batch_size=batch_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        keep_bos=keep_bos,
        resume=resume,
        append=append,
        device=device,
    )
    m = run_ingest(cfg, progress=not quiet)
    click.echo(
        f"run {m['name']}: {m['status']}, {m['tokens']} tokens in {m['contexts']} contexts "
        f"({m['rows_1d']} 1d rows), tables {', '.join(m['tables'])}, snapshot version {len(m['versions'])}"
    )


def relaunch_under_torchrun(nproc: int) -> None:
    """Re-run this very command under torchrun with nproc CPU processes (gloo)."""
    import os
    import subprocess

    args = sys.argv[1:]
    if "--nproc" in args:
        i = args.index("--nproc")
        args = args[:i] + args[i + 2 :]
    else:
        args = [a for a in args if not a.startswith("--nproc=")]
    # torchrun's own parser would take `--run` for an abbreviation of its --run-path
    args = ["--run-name" if a == "--run" else "--run-name=" + a[6:] if a.startswith("--run=") else a for a in args]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    code = subprocess.call(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "saelake.lake",
            *args,
        ],
        env=env,
    )
    sys.exit(code)


@cli.command("ls")
@lake_option
@click.option("--json", "as_json", is_flag=True)
def ls_cmd(lake_uri, as_json):
    """What is in the lake: runs, SAEs, analyses."""
    from .heartbeat import shown_status
    from .lake import Lake

    lake = Lake(lake_uri)
    lake.sync()
    out = {}
    for table, cols in LS_TABLES.items():
        names, rows = lake.query(f"select {cols} from {table} order by 1")
        out[table] = [dict(zip(names, r)) for r in rows]
    for r in out["saes"]:  # a training SAE: its progress, or "stalled (...)" once its heartbeat stopped
        r["status"] = shown_status(json.loads(r.pop("config")))
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    for table, rows in out.items():
        if rows or table == "runs":
            click.echo(f"{table}:")
            click.echo(
                _table(list(rows[0]) if rows else LS_TABLES[table].split(", "), [tuple(r.values()) for r in rows])
                + "\n"
            )


LS_TABLES = {
    "runs": "name, status, model, dataset, tokens, context_size, dtype, layouts, n_versions, hooks",
    "saes": "name, arch, hook, d_sae, k, run, version, tokens_trained, heldout_fvu, heldout_l0, "
    "fvu as train_fvu_in_sample, config",
    "analyses": "name, sae, run, store, n_features, tokens",
}


@cli.command()
@lake_option
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def show(lake_uri, name, as_json):
    """Show one run (model, corpus, hooks, tokens, versions, stats, status), or an SAE."""
    from .lake import Lake

    lake = Lake(lake_uri)
    if name not in lake.run_names():
        # other packages show their own objects (SAEs...): entry points in saelake.show
        for ep in entry_points(group="saelake.show"):
            if ep.load()(lake, name, as_json):
                return
    m = lake.manifest(name)
    if as_json:
        click.echo(json.dumps(m.to_json(), indent=2, default=str))
        return
    click.echo(f"run {m.name}  [{m.status}]" + (f"  error: {m.error}" if m.error else ""))
    for key in (
        "model",
        "dataset",
        "context_size",
        "dtype",
        "tables",
        "tokens",
        "contexts",
        "rows_1d",
        "seed",
        "created",
        "updated",
    ):
        click.echo(f"  {key:13s} {getattr(m, key)}")
    for i, v in enumerate(m.versions, 1):
        click.echo(f"  version {i}: {v.tokens} tokens, lance versions {v.tables}, tag {v.tag}")
    for h in m.hooks:
        s = m.stats.get(h)
        line = f"  hook {h} (d_model {m.d_model[h]}, column {m.columns[h]})"
        if s:
            line += (
                f": norm mean {s.mean_norm:.3g}, median {s.median_norm:.3g}, p99 {s.p99_norm:.3g}, "
                f"max {s.max_norm:.3g}, {100 * s.frac_over_10x_median:.2f}% over 10x median"
            )
        click.echo(line)


@cli.command()
@lake_option
@click.argument("sql")
@click.option("--json", "as_json", is_flag=True)
def query(lake_uri, sql, as_json):
    """One read-only SELECT over the catalog and the lake's tables (tokens__<run>, contexts__<run>, ...)."""
    from .lake import Lake

    names, rows = Lake(lake_uri).query(sql)
    if as_json:
        click.echo(json.dumps([dict(zip(names, r)) for r in rows], indent=2, default=str))
    else:
        click.echo(_table(names, rows))


@cli.group("catalog")
def catalog_group():
    """The DuckDB catalog (an index over the manifests)."""


@catalog_group.command("sync")
@lake_option
def catalog_sync(lake_uri):
    """Rebuild the catalog from the lake's manifests."""
    from .lake import Lake

    lake = Lake(lake_uri)
    counts = lake.sync()
    click.echo(f"catalog {lake.catalog.path}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


@cli.command()
@lake_option
@click.argument("names", nargs=-1)
@click.option(
    "--quick", is_flag=True, help="Check sizes and counts only; do not hash the data files or decode every fragment."
)
def verify(lake_uri, names, quick):
    """Check runs, SAEs, analyses and latent indexes against their records, content checksums, Lance and
    the catalog. Exit 1 on any problem; each damaged file is named with what it belongs to."""
    from .lake import Lake
    from .maintenance import Report, verify_analysis, verify_index, verify_run, verify_sae

    lake = Lake(lake_uri)
    kinds = {
        verify_run: lake.run_names(),
        verify_sae: lake.storage.listdir("saes"),
        verify_analysis: lake.analysis_names(),
        verify_index: lake.index_names(),
    }
    names = list(names) or [n for listed in kinds.values() for n in listed]
    report, items = Report(), 0
    for name in dict.fromkeys(names):
        found = [check for check, listed in kinds.items() if name in listed]
        if not found:
            raise UserError(f"nothing named {name!r} in {lake.root}: see lake ls")
        for check in found:  # an analysis is named after its SAE by default: check both
            report += check(lake, name, deep=not quick)
            items += 1
    for p in report.problems:
        click.echo(p)
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"verified {items} item(s): {len(report.problems)} problem(s)", err=bool(report.problems))
    if report.problems:
        sys.exit(1)


@cli.command()
@lake_option
@click.option("--dry-run", is_flag=True, help="List what would be removed.")
def gc(lake_uri, dry_run):
    """Remove failed runs nothing pins, and Lance versions that are not snapshots."""
    from .lake import Lake
    from .maintenance import gc as run_gc

    removed = run_gc(Lake(lake_uri), dry_run=dry_run)
    for line in removed:
        click.echo(("would remove " if dry_run else "removed ") + line)
    if not removed:
        click.echo("nothing to remove")


@cli.command()
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--grep", default="", help="Only names containing this.")
def hooks(model, grep):
    """List a model's hook names."""
    from .models import load_model

    for name in load_model(model).hook_names():
        if grep in name:
            click.echo(name)


def _load_plugins() -> None:
    for ep in entry_points(group="saelake.commands"):
        cmd = ep.load()
        cli.add_command(cmd, ep.name)


def main(argv: list[str] | None = None) -> None:
    _load_plugins()
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="lake")
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("interrupted: what was committed is kept; an ingest or training resumes with --resume", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    finally:  # a name claimed by a command that failed before writing anything is free again
        from .storage import release_unused_claims

        release_unused_claims()
