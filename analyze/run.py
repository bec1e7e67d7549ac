"""``analyze()``: stream 2d contexts through an SAE and write the feature store."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from saelake.lake import Lake, LiveSource, SnapshotSource, UserError, load_model
from saelake.lake.records import AnalysisRecord
from saelake.lake.storage import check_name
from saelake.train.config import SourceConfig

from .directions import neighbours, top_logits, unembedding, vocab_strings
from .stats import FeatureStats, bookkeeping_threads
from .stores import EmbeddedStore, MongoStore, open_store
from .table import FeatureTable

DEFINITIONS = {
    "density": "count / valid tokens; valid = not BOS (position 0 and document separators) and not the pad token",
    "mean_act": "mean of the non-zero activations (over valid tokens)",
    "max_act": "largest activation over valid tokens",
    "context_max": "a sample's max_act: the feature's largest activation over the context's valid tokens",
    "top": "the top_k contexts by context max (exact)",
    "interval": "interval j: contexts with max in [p_{j+1}·M, p_j·M), p_0 = 1 (top closed), M = the feature's max; "
    "up to per_interval of them by lowest priority hash, chosen while streaming (see analyze/stats.py)",
    "zero": "contexts where the feature is 0 on every valid token, by lowest priority hash",
    "histogram": "non-zero activations in quarter-octave bins [2^(-20+i/4), 2^(-20+(i+1)/4)), plus (0, 2^-20) "
    "and [2^20, max]; only the non-empty bin range is stored",
    "logits": "top/bottom of norm_linear(W_dec[f]) @ W_U (final norm's weight folded in, LayerNorm centring, "
    "its 1/sigma scale and biases dropped; direct path only)",
    "neighbours": "features with the largest decoder cosine similarity (self excluded)",
    "decoder_norms": "per out hook (the record's out_hooks; several out hooks only): the norm of the feature's "
    "decoder into that hook's columns (raw units); relative = each / their sum",
}


@dataclass
class AnalyzeConfig:
    lake: str | None
    sae: str
    run: str | None = None
    version: int | None = None
    tokens: int | None = None
    batch_size: int = 16
    top_k: int = 20
    intervals: tuple[float, ...] = (0.8, 0.6, 0.4)
    per_interval: int = 5
    n_zero: int = 5
    n_logits: int = 10
    n_neighbours: int = 10
    store: str | None = None
    name: str | None = None
    overwrite: bool = False
    live: bool = False
    model: str | None = None
    dataset: str | None = None
    text_column: str = "text"
    context_size: int | None = None
    seed: int = 0
    device: str = "cpu"
    from_index: str | None = None  # a latent index of this SAE (lake encode): its codes instead of encoding
    extra: dict = field(default_factory=dict)


def _stats_from_index(
    cfg: AnalyzeConfig,
    lake: Lake,
    sae_name: str,
    desc: dict,
    T: int,
    n_max: int,
    stats: FeatureStats,
    skip: torch.Tensor,
    bar,
) -> None:
    """The statistics from a latent index's stored codes (float16 values) instead of encoding."""
    from .latent_index import index_batches

    rec = lake.index_record(cfg.from_index)
    if rec is None:
        raise UserError(f"no latent index {cfg.from_index!r}: make one with `lake encode {sae_name}`")
    if rec.status != "complete" or rec.sae != sae_name or (rec.run, rec.version) != (desc["run"], desc["version"]):
        raise UserError(
            f"latent index {rec.name!r} is {rec.status}, of SAE {rec.sae} on {rec.run} v{rec.version}: "
            f"it must be a complete index of {sae_name} on {desc['run']} v{desc['version']}"
        )
    for ctx, doc, tokens, present, rows, lat, vals in index_batches(lake, rec, T, cfg.batch_size):
        n = min(len(ctx), n_max - stats.n_contexts)
        if n <= 0:
            break
        valid = present[:n] & ~torch.isin(tokens[:n], skip)
        first = rows < n * T  # the first n contexts
        rows, lat, vals = rows[first], lat[first], vals[first]
        keep = valid.reshape(-1)[rows]
        stats.update(rows[keep], lat[keep], vals[keep], tokens[:n], valid, ctx[:n], doc[:n])
        if bar is not None:
            bar.update(n * T)


def load_sae(lake: Lake, spec: str):
    """An SAE by catalog name, or a path to an SAE directory (config.json + weights.safetensors)."""
    from saelake.train.records import read_sae_config
    from saelake.train.store import SAEStore, read_weights, sae_from_weights

    path = Path(spec).expanduser()
    if "/" in spec or spec.startswith(".") or (path.is_dir() and (path / "config.json").exists()):
        if not (path / "config.json").exists() or not (path / "weights.safetensors").exists():
            raise UserError(f"SAE {spec!r} not found: no config.json + weights.safetensors in {path}")
        try:
            cfg = json.loads((path / "config.json").read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path / 'config.json'} is not valid JSON ({str(e)[:120]})") from None
        read_sae_config(cfg, str(path / "config.json"))
        weights = path / "weights.safetensors"
        sae = sae_from_weights(cfg, read_weights(weights.read_bytes(), cfg, str(weights)))
        return sae, cfg, cfg.get("name") or path.name
    sae, cfg = SAEStore(lake).load(spec)
    return sae, cfg, spec


def latents(sae, x: torch.Tensor, valid: torch.Tensor):
    """Non-zero latents of valid rows of ``x`` [N, d_in]: (rows, lat, vals)."""
    return latents_of(sae.encode(x), valid)


def latents_of(codes, valid: torch.Tensor):
    """Non-zero latents of valid rows of a dictionary's codes: (rows, lat, vals)."""
    if codes.acts is not None:  # dense [N, S] (ReLU, JumpReLU): one big scan, worth every thread
        f = codes.acts[0]  # >= 0: non-zero is active
        rows, lat = f.nonzero(as_tuple=True)
        keep = valid[rows]
        rows, lat = rows[keep], lat[keep]
        return rows, lat, f[rows, lat]
    with bookkeeping_threads():
        keep = (codes.vals > 0) & valid[codes.bag]
        return codes.bag[keep], codes.lat[keep], codes.vals[keep]


def _source(cfg: AnalyzeConfig, lake: Lake, sae_cfg: dict, hooks: list[str]):
    """-> (source, model spec, context size, description)."""
    if cfg.live:
        spec = cfg.model or sae_cfg.get("model")
        if not spec:
            raise UserError("--live needs --model (the SAE's config names no model)")
        dataset = cfg.dataset or sae_cfg.get("dataset") or "builtin"
        T = cfg.context_size or SourceConfig.context_size
        model = load_model(spec, cfg.device)
        missing = [h for h in hooks if h not in model.hook_names()]
        if missing:
            raise UserError(f"hook {missing[0]!r} of the SAE is not a hook of model {spec}")
        src = LiveSource(
            model, dataset, hooks, T, text_column=cfg.text_column, batch_size=cfg.batch_size, device=cfg.device
        )
        return src, model, T, {"source": "live", "model": spec, "dataset": dataset, "run": None, "version": None}
    run = cfg.run or sae_cfg.get("run")
    if not run:
        raise UserError(
            f"SAE {sae_cfg.get('name')!r} was trained live: give --run RUN (a run with a 2d table) "
            "or --live --model M --dataset D"
        )
    version = (
        cfg.version if cfg.version is not None else (sae_cfg.get("version") if run == sae_cfg.get("run") else None)
    )
    src = SnapshotSource(lake, run, version)
    if "contexts" not in src.snapshot.tables:
        raise UserError(
            f"run {run!r} has no 2d table: ingest one with `lake ingest --layout 2d --run NEW ...` "
            "or analyze with --live --model M --dataset D"
        )
    for h in hooks:
        if h not in src.hooks:
            raise UserError(f"hook {h!r} of the SAE is not in run {run!r}: it has {', '.join(src.hooks)}")
    return (
        src,
        None,
        src.context_size,
        {
            "source": "snapshot",
            "model": src.manifest.model,
            "dataset": src.manifest.dataset,
            "run": run,
            "version": src.version,
        },
    )


def analyze(cfg: AnalyzeConfig, progress: bool = True) -> AnalysisRecord:
    """Analyze one SAE into a feature store; returns the analysis record. Checks all input first."""
    lake = Lake(cfg.lake) if cfg.lake else None
    if lake is None:
        raise UserError("--lake is required to analyze (the SAE and the activations live there)")
    sae, sae_cfg, sae_name = load_sae(lake, cfg.sae)
    hooks = sae.hooks
    src, model, T, desc = _source(cfg, lake, sae_cfg, hooks)
    d_model = sum(src.d_model[h] for h in hooks)
    if sae.d_in != d_model:
        raise UserError(
            f"SAE {sae_name!r} takes inputs of size {sae.d_in}, but hook {','.join(hooks)} has "
            f"d_model {d_model}" + (f" in run {desc['run']!r}" if desc["run"] else "")
        )
    name = check_name(cfg.name or sae_name, "analysis name")
    store = open_store(lake, cfg.store)
    embedded = EmbeddedStore(lake)
    if not cfg.overwrite and (store.exists(name) or embedded.exists(name)):
        raise UserError(f"analysis {name!r} already exists: choose another --name or pass --overwrite")
    if not cfg.overwrite:  # of two analyses named alike started together, one goes on
        lake.storage.claim("analyses", name, owner="lake analyze")
    if model is None:
        model = load_model(desc["model"], cfg.device)
    n_max = math.ceil(cfg.tokens / T) if cfg.tokens else (src.n_contexts if not cfg.live else math.ceil(20_000 / T))

    stats = FeatureStats(
        sae.d_sae,
        T,
        top_k=cfg.top_k,
        intervals=cfg.intervals,
        per_interval=cfg.per_interval,
        n_zero=cfg.n_zero,
        seed=cfg.seed,
    )
    skip = {model.bos_token_id}
    if getattr(model.tokenizer, "pad_token_id", None) is not None:
        skip.add(int(model.tokenizer.pad_token_id))
    skip = torch.tensor(sorted(skip), dtype=torch.int32)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_max * T, unit="tok", desc=f"analyze {name}", smoothing=0.1)
    t0 = time.perf_counter()
    if cfg.from_index:
        _stats_from_index(cfg, lake, sae_name, desc, T, n_max, stats, skip, bar)
    with torch.no_grad():
        for batch in [] if cfg.from_index else src.context_batches(cfg.batch_size, hooks):
            n = min(len(batch), n_max - stats.n_contexts)
            if n <= 0:
                break
            # every kind encodes hook activations of whole contexts: rows are positions, context-major
            codes = sae.encode_acts({h: batch.acts[h][:n].to(cfg.device, torch.float32) for h in hooks})
            tokens = batch.tokens[:n]
            valid = ~torch.isin(tokens, skip)
            rows, lat, vals = latents_of(codes, valid.reshape(-1).to(cfg.device))
            stats.update(rows.cpu(), lat.cpu(), vals.cpu(), tokens, valid, batch.context_id[:n], batch.doc_id[:n])
            if bar is not None:
                bar.update(n * T)
            if stats.n_contexts >= n_max:
                break
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if stats.n_contexts == 0:
        raise UserError("no contexts to analyze: the source is empty")

    W_dec = sae.decoder_directions().float().cpu()  # [d_sae, d_out]: what each feature writes
    W_U, norm = unembedding(model)
    logits = top_logits(W_dec, W_U, norm, cfg.n_logits)
    nbrs = neighbours(W_dec, cfg.n_neighbours) if cfg.n_neighbours > 0 and sae.d_sae > 1 else None
    # several out hooks (a CLT's layers, a crosscoder's models): each feature's decoder norm into each
    dec_norms = sae.decoder_norms().float().cpu() if len(sae.out_hooks) > 1 else None
    vocab = vocab_strings(model.tokenizer, max(W_U.shape[1], len(model.tokenizer)))
    record = AnalysisRecord(
        name=name,
        sae=sae_name,
        run=desc["run"],
        version=desc["version"],
        store=store.where,
        n_features=sae.d_sae,
        tokens=stats.n_valid,
        tokens_total=stats.n_tokens,
        contexts=stats.n_contexts,
        context_size=T,
        hook=",".join(hooks),
        hooks=hooks,
        source=desc["source"],
        model=desc["model"],
        dataset=desc["dataset"],
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=round(seconds, 3),
        tokens_per_second=round(stats.n_tokens / max(seconds, 1e-9), 1),
        final_norm=norm,
        excluded_token_ids=skip.tolist(),
        status="complete",
        definitions=DEFINITIONS,
        out_hooks=sae.out_hooks,
        config={k: v for k, v in asdict(cfg).items() if k not in ("lake", "store", "overwrite", "extra")},
    )
    table = FeatureTable(stats, vocab, logits, nbrs, decoder_norms=dec_norms)
    if isinstance(store, MongoStore):
        store.write(record, table, overwrite=cfg.overwrite, sae_config=sae_cfg)
        lake.storage.write_json(record.to_json(), "analyses", name, "analysis.json")  # a pointer for ls/sync
    else:
        store.write(record, table, overwrite=cfg.overwrite)  # sets the table's name (and checksums) in record
    record = lake.analysis_record(name)  # as written (keys sorted): what `lake catalog sync` will read
    try:
        lake.catalog.upsert_analysis(record.to_json(), lake.storage.uri("analyses", name))
    except Exception as e:  # the store is written; the catalog is an index
        print(f"warning: catalog not updated ({e}); run `lake catalog sync`")
    return record
