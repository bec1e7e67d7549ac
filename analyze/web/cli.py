"""``lake serve`` and ``lake export-dashboard`` (registered through the saelake.commands entry points)."""

from __future__ import annotations

import click

from saelake.lake import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@click.command("serve")
@click.option("--lake", "lake_uri", envvar="SAELAKE_LAKE", required=True, help="Lake root (env SAELAKE_LAKE).")
@click.option(
    "--store",
    default=None,
    help="mongodb://HOST:PORT/DB: also show that store's analyses "
    "(default: each analysis from the store its record names).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to bind (0.0.0.0 exposes the lake to the network).",
)
@click.option("--port", type=int, default=8765, show_default=True, help="Port (0: any free port).")
@click.option("--model", default=None, help="Model for live inference (default: the one each SAE names).")
@click.option("--no-live", is_flag=True, help="No live inference (never load a model).")
@click.option("--quiet", is_flag=True, help="No request log.")
def serve_cmd(lake_uri, store, host, port, model, no_live, quiet):
    """Web UI: the lake, SAEs with training curves, feature dashboards, live inference."""
    from .server import WebApp, make_server

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    app = WebApp(lake_uri, store=store, model=model, live=not no_live)
    st = app.data.lake.storage
    if not st.is_s3 and not st.exists():
        raise UserError(f"no lake at {st.root}: create one with `lake ingest --lake {lake_uri} ...`")
    server = make_server(app, host, port, quiet=quiet)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{server.server_address[1]}/"
    click.echo(f"saelake web UI on {where}  (lake {st.root}; Ctrl-C stops)", err=False)
    if host not in LOOPBACK:
        click.echo(f"warning: listening on {host}: anyone who can reach this machine can read the lake", err=True)
    if app.data.store_uri:
        from .data import StoreDown

        try:
            app.data.store(app.data.store_uri)
        except StoreDown as e:
            click.echo(f"warning: {e} (pages that need it will say so; the server keeps running)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped")
    finally:
        server.server_close()


@click.command("export-dashboard")
@click.option("--lake", "lake_uri", envvar="SAELAKE_LAKE", required=True, help="Lake root (env SAELAKE_LAKE).")
@click.argument("sae")
@click.option("--features", default="0-99", show_default=True, help="Features: 0-99, 1,5,10-20 or all.")
@click.option("-o", "--out", "out_dir", required=True, help="Output directory (created).")
@click.option("--analysis", default=None, help="Analysis name (default: the SAE's newest).")
@click.option("--store", default=None, help="mongodb://HOST:PORT/DB when the analysis lives there.")
def export_dashboard_cmd(lake_uri, sae, features, out_dir, analysis, store):
    """Static, self-contained HTML pages of an SAE's features (no server, no network)."""
    from .export import export_dashboard

    written = export_dashboard(lake_uri, sae, features, out_dir, analysis=analysis, store=store)
    click.echo(f"wrote {len(written)} pages to {out_dir} (open {written[0]})")
