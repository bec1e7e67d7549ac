"""A persistent, queryable index of an SAE's latents over a snapshot (``lake encode``).

``indexes/<name>/latents.lance`` holds one row per valid token (BOS excluded) of the snapshot's
2d table, in context order:

    context_id int64, doc_id int64, position int32, token_id int32,
    features list<int32>, acts list<float16>        (the token's non-zero latents, ascending ids)

about k·6 bytes per token for TopK. ``lake query`` sees it as ``latents__<name>`` (``acts`` as
float32: DuckDB reads no float16), so co-firing, per-document and per-feature questions are SQL.
Commits every ``commit_contexts`` contexts; ``index.json`` (``LatentIndexRecord``) records what
is committed, in which Lance version, with the checksum of every data file, so a killed encode
resumes exactly where its last commit ended (``--resume``).
"""

from __future__ import annotations

import re
import shutil
import time
from datetime import UTC, datetime

import click
import lance
import pyarrow as pa
import torch

from saelake.lake import Lake, SnapshotSource, UserError
from saelake.lake.checksums import data_files, file_checksum
from saelake.lake.cli import lake_option
from saelake.lake.records import LatentIndexRecord
from saelake.lake.storage import check_name

from .run import latents_of, load_sae

TABLE = "latents.lance"
SCHEMA = pa.schema(
    [
        ("context_id", pa.int64()),
        ("doc_id", pa.int64()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("features", pa.list_(pa.int32())),
        ("acts", pa.list_(pa.float16())),
    ]
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _rows(
    batch, n: int, rows: torch.Tensor, lat: torch.Tensor, vals: torch.Tensor, valid: torch.Tensor, T: int, d_sae: int
) -> pa.RecordBatch:
    """Rows of the valid tokens of ``n`` contexts; (rows, lat, vals) are the non-zero latents, rows
    ascending (flat token index)."""
    flat_valid = valid.reshape(-1)
    keep = flat_valid.nonzero().squeeze(1)  # flat token index of each output row
    # per flat token: how many entries, then offsets restricted to the kept tokens
    counts = torch.bincount(rows, minlength=n * T)[keep]
    order = torch.argsort(rows * d_sae + lat)  # token-major, ascending feature ids
    offsets = torch.zeros(len(keep) + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    ctx = batch.context_id[:n].repeat_interleave(T)[keep]
    doc = batch.doc_id[:n].repeat_interleave(T)[keep]
    pos = torch.arange(T, dtype=torch.int32).repeat(n)[keep]
    tok = batch.tokens[:n].reshape(-1)[keep].to(torch.int32)
    off = pa.array(offsets.numpy())
    return pa.RecordBatch.from_arrays(
        [
            pa.array(ctx.numpy()),
            pa.array(doc.numpy()),
            pa.array(pos.numpy()),
            pa.array(tok.numpy()),
            pa.ListArray.from_arrays(off, pa.array(lat[order].to(torch.int32).numpy())),
            pa.ListArray.from_arrays(off, pa.array(vals[order].to(torch.float16).numpy())),
        ],
        schema=SCHEMA,
    )


def encode(
    lake: Lake | str,
    sae_spec: str,
    *,
    run: str | None = None,
    version: int | None = None,
    name: str | None = None,
    batch_size: int = 8,
    commit_contexts: int = 512,
    resume: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> LatentIndexRecord:
    lake = lake if isinstance(lake, Lake) else Lake(lake)
    if batch_size <= 0 or commit_contexts <= 0:
        raise UserError(f"--batch-size and the commit size must be positive, got {batch_size}, {commit_contexts}")
    sae, cfg, sae_name = load_sae(lake, sae_spec)
    name = check_name(name or sae_name, "index name")
    st = lake.storage
    rec = lake.index_record(name)
    if rec is not None and not resume:
        raise UserError(
            f"latent index {name!r} exists ({rec.status}): pick another --name"
            + (", or --resume it" if rec.status != "complete" else "")
        )
    if resume:
        if rec is None:
            raise UserError(f"--resume: no latent index {name!r} in {lake.root}")
        if rec.status == "complete":
            raise UserError(f"--resume: latent index {name!r} is already complete")
        if rec.sae != sae_name or (run and run != rec.run) or (version and version != rec.version):
            raise UserError(
                f"--resume: index {name!r} is of SAE {rec.sae} on {rec.run} v{rec.version}; repeat those settings"
            )
        run, version = rec.run, rec.version
    run = run or cfg.get("run")
    if not run:
        raise UserError(f"SAE {sae_name!r} was trained live: give --run RUN (a run with a 2d table)")
    src = SnapshotSource(lake, run, version)
    if "contexts" not in src.snapshot.tables:
        raise UserError(f"run {run!r} has no 2d table: ingest one with --layout 2d")
    hooks = list(sae.hooks)
    for h in hooks:
        if h not in src.hooks:
            raise UserError(f"hook {h!r} of SAE {sae_name!r} is not in run {run!r}: it has {', '.join(src.hooks)}")
    bos = src.manifest.model_info.bos_token_id
    if rec is None:
        st.claim("indexes", name, owner="lake encode")  # of two encodes named alike, one goes on
        rec = LatentIndexRecord(
            name=name,
            sae=sae_name,
            run=run,
            version=src.version,
            hooks=hooks,
            d_sae=sae.d_sae,
            status="running",
            contexts_done=0,
            contexts_total=src.n_contexts,
            tokens=0,
            entries=0,
            lance_version=None,
            excluded_token_ids=[] if bos is None else [bos],
            checksums={},
            created=_now(),
            updated=_now(),
        )
        st.write_json(rec.to_json(), "indexes", name, "index.json")
    uri = st.uri("indexes", name, TABLE)
    _roll_back(lake, uri, rec)

    T = src.context_size
    skip = torch.tensor(rec.excluded_token_ids, dtype=torch.int32)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rec.contexts_total * T, initial=rec.contexts_done * T, unit="tok", desc=f"encode {name}")
    t0, pending, n_pending = time.perf_counter(), [], 0
    with torch.no_grad():
        for batch in src.context_batches(batch_size, hooks, start=rec.contexts_done):
            n = len(batch)
            codes = sae.encode_acts({h: batch.acts[h].to(device, torch.float32) for h in hooks})  # rows: positions
            valid = ~torch.isin(batch.tokens, skip)
            rows, lat, vals = latents_of(codes, valid.reshape(-1).to(device))
            pending.append(_rows(batch, n, rows.cpu(), lat.cpu(), vals.cpu(), valid, T, sae.d_sae))
            n_pending += n
            if bar is not None:
                bar.update(n * T)
            if n_pending >= commit_contexts:
                rec = _commit(lake, uri, rec, pending, n_pending, time.perf_counter() - t0)
                t0, pending, n_pending = time.perf_counter(), [], 0
    if pending:
        rec = _commit(lake, uri, rec, pending, n_pending, time.perf_counter() - t0)
    if bar is not None:
        bar.close()
    rec.status, rec.updated = "complete", _now()
    st.write_json(rec.to_json(), "indexes", name, "index.json")
    try:
        lake.catalog.upsert_latent_index(rec.to_json(), st.uri("indexes", name))
    except Exception as e:  # the index is written; the catalog is an index of indexes
        print(f"warning: catalog not updated ({e}); run `lake catalog sync`")
    return rec


def _roll_back(lake: Lake, uri: str, rec: LatentIndexRecord) -> None:
    """Make the table hold exactly what ``rec`` says is committed (a crash may have committed more)."""
    st = lake.storage
    if rec.lance_version is None:
        if st.fs.exists(uri):  # a first commit that never reached index.json
            if st.is_s3:
                st.fs.rm(uri, recursive=True)
            else:
                shutil.rmtree(uri)
        return
    ds = lance.dataset(uri, storage_options=st.storage_options)
    if ds.version != rec.lance_version:
        lance.dataset(uri, version=rec.lance_version, storage_options=st.storage_options).restore()


def _commit(
    lake: Lake, uri: str, rec: LatentIndexRecord, batches: list[pa.RecordBatch], n_contexts: int, seconds: float
) -> LatentIndexRecord:
    """Append ``batches`` as one Lance commit, checksum the files it added, then record it."""
    st = lake.storage
    table = pa.Table.from_batches(batches, schema=SCHEMA)
    ds = lance.write_dataset(
        table, uri, mode="create" if rec.lance_version is None else "append", storage_options=st.storage_options
    )
    for path, _ in data_files(ds):
        key = f"{TABLE}/data/{path}"
        if key not in rec.checksums:
            rec.checksums[key] = file_checksum(st, f"{uri}/data/{path}")
    rec.lance_version = ds.version
    rec.contexts_done += n_contexts
    rec.tokens += table.num_rows
    rec.entries += sum(len(b.column("features").flatten()) for b in batches)
    rec.seconds = round(rec.seconds + seconds, 3)
    rec.updated = _now()
    st.write_json(rec.to_json(), "indexes", rec.name, "index.json")
    return rec


def relations(lake: Lake, sql: str) -> dict:
    """``latents__<index>`` for every one the SQL mentions (names spelled with ``_`` for other characters)."""
    names = {re.sub(r"[^A-Za-z0-9_]", "_", n): n for n in lake.index_names()}
    out = {}
    for key in set(re.findall(r"\blatents__([A-Za-z0-9_]+)\b", sql)):
        name = names.get(key)
        if name is None:
            raise UserError(f"no latent index {key!r} for latents__{key}: make one with `lake encode`")
        rec = lake.index_record(name)
        if rec.lance_version is None:
            raise UserError(f"latent index {name!r} has nothing committed yet")
        ds = lance.dataset(
            lake.storage.uri("indexes", name, TABLE),
            version=rec.lance_version,
            storage_options=lake.storage.storage_options,
        )
        cols = [f for f in SCHEMA.names if "*" in sql or re.search(rf"\b{f}\b", sql)] or ["context_id"]
        schema = pa.schema([pa.field("acts", pa.list_(pa.float32())) if f == "acts" else SCHEMA.field(f) for f in cols])

        def batches(ds=ds, cols=cols, schema=schema):
            for b in ds.scanner(columns=cols, batch_size=65536).to_batches():
                yield b.cast(schema) if "acts" in cols else b  # DuckDB reads no float16

        out[f"latents__{key}"] = pa.RecordBatchReader.from_batches(schema, batches())
    return out


@click.command("encode")
@lake_option
@click.argument("sae")
@click.option("--run", "--run-name", "run", default=None, help="Snapshot run (default: the SAE's).")
@click.option("--version", type=int, default=None, help="Snapshot version (default: the SAE's, else the latest).")
@click.option("--name", default=None, help="Index name (default: the SAE's name); SQL: latents__<name>.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Contexts per encoder batch.")
@click.option("--commit-contexts", type=int, default=512, show_default=True, help="Contexts per Lance commit.")
@click.option("--resume", is_flag=True, help="Continue an interrupted encode after its last commit.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def encode_cmd(lake_uri, sae, run, version, name, batch_size, commit_contexts, resume, device, quiet):
    """Write an SAE's sparse codes over a snapshot into the lake: a latent index for SQL."""
    rec = encode(
        lake_uri,
        sae,
        run=run,
        version=version,
        name=name,
        batch_size=batch_size,
        commit_contexts=commit_contexts,
        resume=resume,
        progress=not quiet,
        device=device,
    )
    click.echo(
        f"latent index {rec.name}: {rec.tokens} tokens of {rec.run} v{rec.version}, {rec.entries} non-zero "
        f"latents ({rec.entries / max(rec.tokens, 1):.1f} per token); query it as "
        f"latents__{re.sub(r'[^A-Za-z0-9_]', '_', rec.name)}"
    )


def index_batches(lake: Lake, rec: LatentIndexRecord, T: int, batch_size: int):
    """Whole contexts from a latent index, in context order, ``batch_size`` at a time: (context_id [n],
    doc_id [n], tokens [n, T] (excluded positions get the first excluded id, i.e. BOS), present [n, T]
    (the index has the token), and the non-zero latents as (rows = context·T + position, lat, vals))."""
    ds = lance.dataset(
        lake.storage.uri("indexes", rec.name, TABLE),
        version=rec.lance_version,
        storage_options=lake.storage.storage_options,
    )
    fill = rec.excluded_token_ids[0] if rec.excluded_token_ids else 0
    buf: list[dict[str, torch.Tensor]] = []

    def as_tensors(b: pa.RecordBatch) -> dict[str, torch.Tensor]:
        feats, acts = b.column("features"), b.column("acts")
        return {
            "ctx": torch.from_numpy(b.column("context_id").to_numpy()),
            "doc": torch.from_numpy(b.column("doc_id").to_numpy()),
            "pos": torch.from_numpy(b.column("position").to_numpy()).long(),
            "tok": torch.from_numpy(b.column("token_id").to_numpy()),
            "len": torch.from_numpy(feats.value_lengths().to_numpy(zero_copy_only=False)).long(),
            "lat": torch.from_numpy(feats.flatten().to_numpy()).long(),
            "val": torch.from_numpy(acts.flatten().to_numpy()).float(),
        }

    def emit(t: dict[str, torch.Tensor]):
        ctx, first = torch.unique_consecutive(t["ctx"], return_inverse=True)
        n = len(ctx)
        tokens = torch.full((n, T), fill, dtype=torch.int32)
        present = torch.zeros(n, T, dtype=torch.bool)
        tokens[first, t["pos"]] = t["tok"].to(torch.int32)
        present[first, t["pos"]] = True
        doc = torch.zeros(n, dtype=torch.long)
        doc[first] = t["doc"]
        rows = (first * T + t["pos"]).repeat_interleave(t["len"])
        return ctx, doc, tokens, present, rows, t["lat"], t["val"]

    def cat(parts):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    for b in ds.scanner(batch_size=65536).to_batches():
        buf.append(as_tensors(b))
        t = cat(buf)
        ctx = torch.unique_consecutive(t["ctx"])
        while len(ctx) > batch_size:  # the last context may continue in the next record batch
            cut = int(torch.searchsorted(t["ctx"], ctx[batch_size]))
            ecut = int(t["len"][:cut].sum())
            head = {k: (v[:ecut] if k in ("lat", "val") else v[:cut]) for k, v in t.items()}
            t = {k: (v[ecut:] if k in ("lat", "val") else v[cut:]) for k, v in t.items()}
            yield emit(head)
            ctx = ctx[batch_size:]
        buf = [t]
    if buf and len(buf[0]["ctx"]):
        yield emit(buf[0])
