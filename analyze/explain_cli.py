"""``lake explain``, ``lake score`` and ``lake features`` (registered through the saelake.commands entry points)."""

from __future__ import annotations

import json

import click

from saelake.lake import UserError

_lake = click.option("--lake", "lake_uri", envvar="SAELAKE_LAKE", default=None, help="Lake root (env SAELAKE_LAKE).")
_store = click.option("--store", default=None, help="mongodb://HOST:PORT/DB (default: as the analysis record says).")
_analysis = click.option("--analysis", default=None, help="Analysis name (default: the SAE's newest).")
_model_opts = [
    click.option(
        "--model",
        default=None,
        help="local: a model folder or smollm2-135m (default); URL: the model name the server expects.",
    ),
    click.option(
        "--api-key-env",
        default=None,
        metavar="NAME",
        help="Environment variable holding the server's API key (sent as a bearer token, never stored).",
    ),
    click.option(
        "--timeout",
        "timeout_s",
        type=float,
        default=120.0,
        show_default=True,
        help="Seconds to wait for one answer of a server.",
    ),
]


def _with(options):
    def wrap(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return wrap


@click.command("explain")
@_lake
@_store
@click.argument("sae")
@_analysis
@click.option("--features", default=None, help="Features: 0-99, 1,5,10-20 or all (default: the first 100).")
@click.option(
    "--explainer",
    default="local",
    show_default=True,
    help="local (a model on this machine) or the URL of an OpenAI-compatible server (http://host:port/v1).",
)
@_with(_model_opts)
@click.option("--top-examples", "n_top", type=int, default=10, show_default=True, help="Top examples shown.")
@click.option(
    "--interval-examples",
    "n_interval",
    type=int,
    default=2,
    show_default=True,
    help="Examples shown from each activation interval.",
)
@click.option("--max-tokens", type=int, default=32, show_default=True, help="Tokens the explainer may write.")
@click.option("--overwrite", is_flag=True, help="Explain features that already have an explanation again.")
@click.option(
    "--import",
    "import_file",
    default=None,
    metavar="FILE",
    help='Import explanations (and notes) from JSON instead: [{"feature": 3, "explanation": "..."}].',
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def explain_cmd(
    lake_uri,
    store,
    sae,
    analysis,
    features,
    explainer,
    model,
    api_key_env,
    timeout_s,
    n_top,
    n_interval,
    max_tokens,
    overwrite,
    import_file,
    quiet,
):
    """Explain features with a chat model (or import explanations) -> the analysis's store."""
    from .explain import ExplainConfig, explain, import_explanations

    if import_file:
        name, n = import_explanations(lake_uri, store, sae, analysis, import_file)
        click.echo(f"imported {n} explanations into analysis {name}")
        return
    cfg = ExplainConfig(
        lake=lake_uri,
        sae=sae,
        analysis=analysis,
        store=store,
        features=features,
        explainer=explainer,
        model=model,
        api_key_env=api_key_env,
        n_top=n_top,
        n_interval=n_interval,
        max_tokens=max_tokens,
        overwrite=overwrite,
        timeout_s=timeout_s,
    )
    r = explain(cfg, progress=not quiet)
    click.echo(
        f"explained {r.explained} features of analysis {r.analysis} with {r.explainer} ({r.model}) in "
        f"{r.seconds:.1f} s ({r.seconds_per_feature:.2f} s per feature)"
        + (f"; {r.skipped_done} already explained (--overwrite redoes them)" if r.skipped_done else "")
        + (f"; {r.skipped_dead} never fired" if r.skipped_dead else "")
    )


@click.command("score")
@_lake
@_store
@click.argument("sae")
@_analysis
@click.option(
    "--features",
    default="all",
    show_default=True,
    help="Features: 0-99, 1,5,10-20 or all (those with an explanation are scored).",
)
@click.option(
    "--scorer",
    default="local",
    show_default=True,
    help="local or the URL of an OpenAI-compatible server, as for lake explain.",
)
@_with(_model_opts)
@click.option(
    "--examples",
    "n_examples",
    type=int,
    default=10,
    show_default=True,
    help="At most this many activating and non-activating examples per feature.",
)
@click.option("--overwrite", is_flag=True, help="Score features that already have scores again.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def score_cmd(
    lake_uri, store, sae, analysis, features, scorer, model, api_key_env, timeout_s, n_examples, overwrite, quiet
):
    """Detection and fuzzing scores (balanced accuracy) of the explanations -> beside them in the store."""
    from .score import ScoreConfig, score

    cfg = ScoreConfig(
        lake=lake_uri,
        sae=sae,
        analysis=analysis,
        store=store,
        features=features,
        scorer=scorer,
        model=model,
        api_key_env=api_key_env,
        n_examples=n_examples,
        overwrite=overwrite,
        timeout_s=timeout_s,
    )
    r = score(cfg, progress=not quiet)
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    click.echo(
        f"scored {r.scored} features of analysis {r.analysis} in {r.seconds:.1f} s: mean detection "
        f"{fmt(r.mean_detection)}, mean fuzzing {fmt(r.mean_fuzzing)}"
        + (f" ({r.skipped} skipped: unexplained or already scored)" if r.skipped else "")
        + (
            f"; {r.unscorable} had no examples the explainer did not see (explain with fewer "
            "--top-examples, or analyze with more --top-k)"
            if r.unscorable
            else ""
        )
    )


@click.command("features")
@_lake
@_store
@click.argument("sae")
@_analysis
@click.option(
    "--search",
    default=None,
    help="Only features whose explanation, note, top activating or top "
    "promoted tokens contain TEXT (case-insensitive).",
)
@click.option(
    "--sort",
    type=click.Choice(["feature", "density", "max_act", "detection", "fuzzing"]),
    default="feature",
    show_default=True,
)
@click.option("--desc", is_flag=True, help="Sort descending.")
@click.option("--limit", type=int, default=50, show_default=True, help="Rows to print (0: all).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def features_cmd(lake_uri, store, sae, analysis, search, sort, desc, limit, as_json):
    """List an analysis's features with their labels and scores; search them."""
    from saelake.lake import Lake

    from .cli import find_analysis
    from .explanations import explanation_store
    from .labels import label, token_summaries
    from .labels import search as search_labels

    if limit < 0:
        raise UserError("--limit must be >= 0")
    st, rec = find_analysis(lake_uri, store, sae, analysis)
    lake = Lake(lake_uri) if lake_uri else None
    mongo = None if rec.store == "embedded" else st
    expl = explanation_store(lake, rec, mongo=mongo)
    rows = {r["feature"]: r for r in st.scalars(rec.name)}
    notes = expl.rows(rec.name)
    sums = token_summaries(lake, rec, mongo=mongo)
    keep = (
        sorted(rows) if not search else sorted(search_labels(search, expl.search(rec.name, search), sums) & set(rows))
    )
    out = []
    for f in keep:
        e = notes.get(f) or {}
        text, source = label(e, sums.get(f))
        out.append(
            {
                "feature": f,
                "density": rows[f]["density"],
                "max_act": rows[f]["max_act"],
                "detection": e.get("detection"),
                "fuzzing": e.get("fuzzing"),
                "label": text,
                "source": source,
            }
        )
    if sort != "feature":  # missing scores last either way
        out.sort(key=lambda r: (r[sort] is None, -(r[sort] or 0) if desc else (r[sort] or 0)))
    elif desc:
        out.reverse()
    shown = out[:limit] if limit else out
    if as_json:
        for r in shown:
            click.echo(json.dumps(r))
        return
    fmt = lambda v, d=3: "–" if v is None else f"{v:.{d}g}"  # noqa: E731
    click.echo(
        f"{len(out)} of {len(rows)} features of analysis {rec.name}"
        + (f" match {search!r}" if search else "")
        + (f" (first {len(shown)})" if len(shown) < len(out) else "")
    )
    click.echo(f"{'feature':>7}  {'density':>9}  {'max_act':>7}  {'det.':>5}  {'fuzz.':>5}  label")
    for r in shown:
        click.echo(
            f"{r['feature']:>7}  {fmt(r['density']):>9}  {fmt(r['max_act']):>7}  {fmt(r['detection'], 2):>5}  "
            f"{fmt(r['fuzzing'], 2):>5}  {' '.join(r['label'].split())}"
        )
