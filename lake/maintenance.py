"""``lake verify`` and ``lake gc``: check a lake against its manifests; reclaim space safely."""
from __future__ import annotations

import hashlib
from datetime import timedelta

import lance

from .lake import Lake


def _fragment_files(ds: lance.LanceDataset) -> list[tuple[str, int | None]]:
    out = []
    for frag in ds.get_fragments():
        for f in frag.metadata.files:
            out.append((f.path, getattr(f, "file_size_bytes", None)))
    return out


def verify_run(lake: Lake, run: str, deep: bool = True) -> list[str]:
    """Problems with one run (empty = healthy): manifest vs Lance vs catalog, file sizes, decoding."""
    problems: list[str] = []
    m = lake.manifest(run)
    if m.status != "complete":
        problems.append(f"run {run}: status is {m.status}" + (f" ({m.error})" if m.error else "")
                        + ": finish it with lake ingest --resume, or lake gc removes it")
    for i, snap in enumerate(m.versions, 1):
        for table, version in snap.tables.items():
            where = f"run {run} snapshot {i} {table}.lance@v{version}"
            try:
                ds = lance.dataset(lake.table_uri(run, table), version=version,
                                   storage_options=lake.storage.storage_options)
            except Exception as e:
                problems.append(f"{where}: cannot open ({str(e).splitlines()[0][:150]})")
                continue
            if ds.count_rows() != snap.rows[table]:
                problems.append(f"{where}: {ds.count_rows()} rows, manifest says {snap.rows[table]}")
            if i == len(m.versions):
                problems += _check_files(lake, run, table, ds, deep)
    try:
        # run names are checked to be [A-Za-z0-9_.-], so quoting them is safe
        _, rows = lake.catalog.query(f"select status, tokens, n_versions from runs where name = '{run}'")
    except Exception:
        rows = None
    if rows is not None and lake.catalog.path.exists():
        if not rows:
            problems.append(f"run {run}: missing from the catalog (lake catalog sync)")
        elif rows[0] != (m.status, m.tokens, len(m.versions)):
            problems.append(f"run {run}: catalog says {rows[0]}, manifest says "
                            f"{(m.status, m.tokens, len(m.versions))} (lake catalog sync)")
    return problems


def _check_files(lake: Lake, run: str, table: str, ds: lance.LanceDataset, deep: bool) -> list[str]:
    problems = []
    data_dir = lake.storage.uri("runs", run, f"{table}.lance", "data")
    for path, size in _fragment_files(ds):
        full = f"{data_dir}/{path}"
        try:
            actual = lake.storage.fs.size(full)
        except FileNotFoundError:
            problems.append(f"run {run} {table}: data file {full} is missing")
            continue
        if size and actual != size:
            problems.append(f"run {run} {table}: data file {full} is {actual} bytes, Lance recorded {size} "
                            "(truncated or overwritten)")
    if deep and not problems:
        for frag in ds.get_fragments():
            try:
                for _ in frag.to_batches(batch_size=65536):
                    pass
            except Exception as e:
                files = ", ".join(f.path for f in frag.metadata.files)
                problems.append(f"run {run} {table}: fragment {frag.fragment_id} ({files}) cannot be read: "
                                f"{str(e).splitlines()[0][:150]}")
    return problems


def verify_sae(lake: Lake, name: str) -> list[str]:
    st = lake.storage
    cfg = st.read_json("saes", name, "config.json")
    if cfg is None:
        return [f"sae {name}: config.json is missing"]
    problems = []
    if not st.exists("saes", name, "weights.safetensors"):
        return [f"sae {name}: weights.safetensors is missing"]
    want = cfg.get("weights_sha256")
    if want:
        got = hashlib.sha256(st.fs.cat(st.uri("saes", name, "weights.safetensors"))).hexdigest()
        if got != want:
            problems.append(f"sae {name}: weights.safetensors checksum {got[:12]}... differs from config "
                            f"{want[:12]}... (corrupted)")
    run = cfg.get("run")
    if run and run not in lake.run_names() and not cfg.get("live"):
        problems.append(f"sae {name}: trained on run {run}, which is not in the lake")
    return problems


def pins(lake: Lake) -> set[tuple[str, int]]:
    """(run, snapshot version) pairs that an SAE or an analysis was made from."""
    st = lake.storage
    out = set()
    for n in st.listdir("saes"):  # SAE configs are train's records: only these two keys matter here
        cfg = st.read_json("saes", n, "config.json") or {}
        if cfg.get("run"):
            out.add((cfg["run"], int(cfg.get("version") or 0)))
    for n in lake.analysis_names():
        rec = lake.analysis_record(n)
        if rec.run:
            out.add((rec.run, rec.version or 0))
    return out


def gc(lake: Lake, dry_run: bool = False) -> list[str]:
    """Remove failed runs nothing pins, and Lance versions that are no snapshot. Returns what it removed."""
    from .writer import Lease

    removed = []
    pinned = pins(lake)
    for run in lake.run_names():
        m = lake.manifest(run)
        holder = Lease(lake, run)._holder()
        if holder:
            continue  # being written right now
        if m.status != "complete" and not m.versions:
            if any(r == run for r, _ in pinned):
                continue
            removed.append(f"run {run} ({m.status}, never completed)")
            if not dry_run:
                lake.storage.remove("runs", run)
            continue
        for table in m.tables:
            ds = lake.dataset(run, table)
            keep = {v.tables[table] for v in m.versions if table in v.tables} | {ds.latest_version}
            old = [v["version"] for v in ds.versions() if v["version"] not in keep]
            # runs only append, so the latest version references every committed data file
            used = {p for p, _ in _fragment_files(ds)}
            orphans = [f for f in lake.storage.listdir("runs", run, f"{table}.lance", "data") if f not in used]
            if old or orphans:
                removed.append(f"run {run} {table}.lance: {len(old)} intermediate versions, {len(orphans)} "
                               "uncommitted data files")
                if not dry_run:  # snapshot versions are tagged complete-N; Lance keeps tagged versions
                    ds.cleanup_old_versions(older_than=timedelta(0), delete_unverified=True,
                                            error_if_tagged_old_versions=False)
    if not dry_run and removed:
        lake.sync()
    return removed
