"""``lake analyze`` and ``lake feature`` (registered through the saelake.commands entry points)."""

from __future__ import annotations

import click

from saelake.lake import UserError


def _intervals(value: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--intervals takes comma-separated fractions like 0.8,0.6,0.4, got {value!r}") from None
    if any(not 0 < p < 1 for p in out) or list(out) != sorted(out, reverse=True) or len(set(out)) != len(out):
        raise UserError(f"--intervals must be decreasing fractions in (0, 1), got {value!r}")
    return out


def _positive(name: str, v: int | None, zero_ok: bool = False) -> None:
    if v is not None and (v < 0 or (v == 0 and not zero_ok)):
        raise UserError(f"--{name} must be {'>= 0' if zero_ok else 'positive'}, got {v}")


@click.command("analyze")
@click.option("--lake", "lake_uri", envvar="SAELAKE_LAKE", required=True, help="Lake root (env SAELAKE_LAKE).")
@click.argument("sae")
@click.option("--run", default=None, help="Run with a 2d table (default: the SAE's training run).")
@click.option("--version", type=int, default=None, help="Snapshot version (default: the SAE's, else latest).")
@click.option(
    "--tokens", type=int, default=None, help="Tokens to analyze, in whole contexts (default: all; live 20000)."
)
@click.option("--batch-size", type=int, default=16, show_default=True, help="Contexts per batch.")
@click.option("--top-k", type=int, default=20, show_default=True, help="Top contexts per feature.")
@click.option("--intervals", default="0.8,0.6,0.4", show_default=True, help="Interval bounds (fractions of max).")
@click.option("--per-interval", type=int, default=5, show_default=True, help="Samples per interval.")
@click.option("--non-activating", type=int, default=5, show_default=True, help="Non-activating contexts per feature.")
@click.option("--logits", "n_logits", type=int, default=10, show_default=True, help="Top/bottom output tokens.")
@click.option("--neighbours", "n_neighbours", type=int, default=10, show_default=True, help="Nearest features.")
@click.option("--store", default=None, help="mongodb://HOST:PORT/DB (default: embedded Lance tables in the lake).")
@click.option("--name", default=None, help="Analysis name (default: the SAE's name).")
@click.option("--overwrite", is_flag=True, help="Replace an existing analysis of that name.")
@click.option("--live", is_flag=True, help="Run the model instead of reading a snapshot.")
@click.option("--model", default=None, help="--live: model (default: the SAE's).")
@click.option("--dataset", default=None, help="--live: corpus (default: the SAE's, else builtin).")
@click.option("--context-size", type=int, default=None, help="--live: context size (default 128).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample priority hash.")
@click.option(
    "--from-index", default=None, help="Take the codes from this latent index (lake encode) instead of encoding."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def analyze_cmd(
    lake_uri,
    sae,
    run,
    version,
    tokens,
    batch_size,
    top_k,
    intervals,
    per_interval,
    non_activating,
    n_logits,
    n_neighbours,
    store,
    name,
    overwrite,
    live,
    model,
    dataset,
    context_size,
    seed,
    from_index,
    quiet,
):
    """Per-feature statistics and samples of an SAE -> a feature store."""
    from .run import AnalyzeConfig, analyze

    for opt, v, z in (
        ("tokens", tokens, False),
        ("batch-size", batch_size, False),
        ("top-k", top_k, False),
        ("per-interval", per_interval, True),
        ("non-activating", non_activating, True),
        ("logits", n_logits, True),
        ("neighbours", n_neighbours, True),
    ):
        _positive(opt, v, z)
    if not live and (model or dataset or context_size):
        raise UserError("--model/--dataset/--context-size are for --live (a snapshot knows its model)")
    cfg = AnalyzeConfig(
        lake=lake_uri,
        sae=sae,
        run=run,
        version=version,
        tokens=tokens,
        batch_size=batch_size,
        top_k=top_k,
        intervals=_intervals(intervals),
        per_interval=per_interval,
        n_zero=non_activating,
        n_logits=n_logits,
        n_neighbours=n_neighbours,
        store=store,
        name=name,
        overwrite=overwrite,
        live=live,
        model=model,
        dataset=dataset,
        context_size=context_size,
        seed=seed,
        from_index=from_index,
    )
    rec = analyze(cfg, progress=not quiet)
    click.echo(
        f"analysis {rec.name}: {rec.n_features} features of {rec.sae} over {rec.tokens} valid "
        f"tokens ({rec.contexts} contexts, {rec.tokens_per_second:.0f} tok/s) -> {rec.store}"
    )


def find_analysis(lake_uri: str | None, store: str | None, sae: str, name: str | None):
    """-> (store, record) of the named analysis, or the newest one of ``sae``."""
    from saelake.lake import Lake

    from .stores import EmbeddedStore, MongoStore, open_store

    if store:
        st = (
            open_store(Lake(lake_uri), store)
            if lake_uri
            else MongoStore(store)
            if store.startswith("mongodb")
            else None
        )
        if st is None:
            raise UserError("--lake is required for the embedded store")
        candidates = [st.record(name)] if name else st.records(sae)
    else:
        if not lake_uri:
            raise UserError("give --lake URI (or --store mongodb://...)")
        st = EmbeddedStore(Lake(lake_uri))
        candidates = [st.record(name)] if name else st.records(sae)
    candidates = [c for c in candidates if c and c.sae == sae]
    if not candidates:
        raise UserError(
            f"no analysis {name!r} of SAE {sae!r}"
            if name
            else f"no analysis of SAE {sae!r}: run `lake analyze {sae}` first"
        )
    rec = max(candidates, key=lambda c: c.created)
    if not store and rec.store != "embedded":
        st = MongoStore(rec.store)  # the record names the URI without its password
    return st, rec


@click.command("feature")
@click.option("--lake", "lake_uri", envvar="SAELAKE_LAKE", default=None, help="Lake root (env SAELAKE_LAKE).")
@click.option("--store", default=None, help="mongodb://HOST:PORT/DB (default: as the analysis record says).")
@click.argument("sae")
@click.argument("index", type=int)
@click.option("--analysis", "name", default=None, help="Analysis name (default: the SAE's newest).")
@click.option("--top", "n_top", type=int, default=10, show_default=True, help="Top contexts to show.")
@click.option("--window", type=int, default=12, show_default=True, help="Tokens shown before the peak.")
def feature_cmd(lake_uri, store, sae, index, name, n_top, window):
    """Show one feature: statistics, output tokens, neighbours, contexts with activating tokens highlighted."""
    from .view import show_feature

    st, rec = find_analysis(lake_uri, store, sae, name)
    if not 0 <= index < rec.n_features:
        raise UserError(f"feature {index} out of range: SAE {sae!r} has features 0..{rec.n_features - 1}")
    feat = st.feature(rec.name, index)
    if feat is None:
        raise UserError(f"feature {index} is missing from analysis {rec.name!r}")
    from saelake.lake import Lake

    from .explanations import explanation_store
    from .labels import feature_summary, label

    nbrs = list(feat["neighbours"][:8])
    expl = explanation_store(
        Lake(lake_uri) if lake_uri else None, rec, mongo=None if rec.store == "embedded" else st
    ).rows(rec.name, [index, *nbrs])
    labels = {j: label(expl.get(j), feature_summary(row))[0] for j in nbrs if (row := st.feature(rec.name, j))}
    show_feature(rec, feat, n_top=n_top, window=window, explanation=expl.get(index), labels=labels)
