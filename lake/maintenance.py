"""``lake verify`` and ``lake gc``: check a lake against its manifests and checksums; reclaim space safely."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import timedelta

import lance

from . import checksums
from .lake import Lake


@dataclass
class Report:
    """What ``lake verify`` found: problems (exit 1) and notes (what could not be checked, and why)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __iadd__(self, other: Report) -> Report:
        self.problems += other.problems
        self.notes += other.notes
        return self


def verify_run(lake: Lake, run: str, deep: bool = True) -> Report:
    """Manifest vs Lance vs catalog, then the data files of the latest snapshot: sizes, and with
    ``deep`` their content checksums and decoding."""
    report = Report()
    problems = report.problems
    m = lake.manifest(run)
    if m.status != "complete":
        problems.append(
            f"run {run}: status is {m.status}"
            + (f" ({m.error})" if m.error else "")
            + ": finish it with lake ingest --resume, or lake gc removes it"
        )
    for i, snap in enumerate(m.versions, 1):
        for table, version in snap.tables.items():
            where = f"run {run} snapshot {i} {table}.lance@v{version}"
            try:
                ds = lance.dataset(
                    lake.table_uri(run, table), version=version, storage_options=lake.storage.storage_options
                )
            except Exception as e:
                problems.append(f"{where}: cannot open ({str(e).splitlines()[0][:150]})")
                continue
            if ds.count_rows() != snap.rows[table]:
                problems.append(f"{where}: {ds.count_rows()} rows, manifest says {snap.rows[table]}")
            if i == len(m.versions):
                report += _check_files(lake, run, table, ds, deep, m.checksums_from)
    if m.versions and m.checksums_from is None:
        report.notes.append(
            f"run {run}: no checksums recorded (written before saelake recorded them): sizes "
            "and decoding checked, contents not"
        )
    rows = None
    if lake.catalog.path.exists():  # no catalog yet is fine: it is an index (lake catalog sync)
        try:
            # run names are checked to be [A-Za-z0-9_.-], so quoting them is safe
            _, rows = lake.catalog.query(f"select status, tokens, n_versions from runs where name = '{run}'")
        except Exception:
            pass
    if rows is not None:
        if not rows:
            problems.append(f"run {run}: missing from the catalog (lake catalog sync)")
        elif rows[0] != (m.status, m.tokens, len(m.versions)):
            problems.append(
                f"run {run}: catalog says {rows[0]}, manifest says "
                f"{(m.status, m.tokens, len(m.versions))} (lake catalog sync)"
            )
    return report


def _check_files(
    lake: Lake, run: str, table: str, ds: lance.LanceDataset, deep: bool, checksums_from: int | None
) -> Report:
    """Every data file of one table version against its size and checksum; then (deep) decode it."""
    report = Report()
    st, where = lake.storage, f"run {run} {table}"
    data_dir = st.uri("runs", run, f"{table}.lance", "data")
    sums = checksums.recorded(st, run, table) if checksums_from is not None else {}
    unrecorded = 0
    for path, size in checksums.data_files(ds):
        want = sums.get(path)
        if want is None and checksums_from is not None:
            if checksums_from == 0:  # this run recorded a checksum for every commit
                report.problems.append(f"{where}: no checksum recorded for data file {data_dir}/{path}")
            unrecorded += 1
        problem = checksums.check(st, where, f"{data_dir}/{path}", size, want, deep)
        if problem:
            report.problems.append(problem)
    if unrecorded and checksums_from:
        report.notes.append(
            f"{where}: {unrecorded} data file(s) predate checksums (the run was started before "
            "saelake recorded them): sizes and decoding checked, contents not"
        )
    if deep and not report.problems:
        for frag in ds.get_fragments():
            try:
                for _ in frag.to_batches(batch_size=65536):
                    pass
            except Exception as e:
                files = ", ".join(f.path for f in frag.metadata.files)
                report.problems.append(
                    f"{where}: fragment {frag.fragment_id} ({files}) cannot be read: {str(e).splitlines()[0][:150]}"
                )
    return report


def verify_sae(lake: Lake, name: str, deep: bool = True) -> Report:
    st = lake.storage
    cfg = st.read_json("saes", name, "config.json")
    if cfg is None:
        return Report([f"sae {name}: config.json is missing"])
    if not st.exists("saes", name, "weights.safetensors"):
        return Report([f"sae {name}: weights.safetensors is missing"])
    report = Report()
    want = cfg.get("weights_sha256")  # SAE configs are train's records: lake reads only what it checks
    if not want:
        report.notes.append(f"sae {name}: no weights checksum recorded")
    elif deep:
        got = hashlib.sha256(st.fs.cat(st.uri("saes", name, "weights.safetensors"))).hexdigest()
        if got != want:
            report.problems.append(
                f"sae {name}: weights.safetensors checksum {got[:12]}... differs from config {want[:12]}... (corrupted)"
            )
    run = cfg.get("run")
    if run and run not in lake.run_names() and not cfg.get("live"):
        report.problems.append(f"sae {name}: trained on run {run}, which is not in the lake")
    return report


def verify_analysis(lake: Lake, name: str, deep: bool = True) -> Report:
    """An embedded analysis: its feature table's data files against the record's checksums."""
    rec = lake.analysis_record(name)
    report, where = Report(), f"analysis {name}"
    if rec.features_table is None:
        return report  # stored in MongoDB: the lake holds only a pointer
    table_uri = lake.storage.uri("analyses", name, rec.features_table)
    try:
        ds = lance.dataset(table_uri, storage_options=lake.storage.storage_options)
        files = checksums.data_files(ds)
    except Exception as e:
        return Report([f"{where}: cannot open its feature table {table_uri} ({str(e).splitlines()[0][:150]})"])
    if rec.checksums is None:
        report.notes.append(f"{where}: no checksums recorded (written before saelake recorded them)")
    for path, size in files:
        key = f"{rec.features_table}/data/{path}"
        want = (rec.checksums or {}).get(key)
        if rec.checksums is not None and want is None:
            report.problems.append(f"{where}: no checksum recorded for data file {table_uri}/data/{path}")
        problem = checksums.check(lake.storage, where, f"{table_uri}/data/{path}", size, want, deep)
        if problem:
            report.problems.append(problem)
    return report


def verify_index(lake: Lake, name: str, deep: bool = True) -> Report:
    """A latent index (``lake encode``): the data files of its committed version against its record."""
    rec = lake.index_record(name)
    report, where = Report(), f"index {name}"
    if rec.lance_version is None:
        return report
    table_uri = lake.storage.uri("indexes", name, "latents.lance")
    try:
        ds = lance.dataset(table_uri, version=rec.lance_version, storage_options=lake.storage.storage_options)
        files = checksums.data_files(ds)
    except Exception as e:
        return Report([f"{where}: cannot open its table {table_uri} ({str(e).splitlines()[0][:150]})"])
    for path, size in files:
        want = rec.checksums.get(f"latents.lance/data/{path}")
        if want is None:
            report.problems.append(f"{where}: no checksum recorded for data file {table_uri}/data/{path}")
        problem = checksums.check(lake.storage, where, f"{table_uri}/data/{path}", size, want, deep)
        if problem:
            report.problems.append(problem)
    if rec.run not in lake.run_names():
        report.problems.append(f"{where}: made from run {rec.run}, which is not in the lake")
    return report


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
            used = {p for p, _ in checksums.data_files(ds)}
            orphans = [f for f in lake.storage.listdir("runs", run, f"{table}.lance", "data") if f not in used]
            if old or orphans:
                removed.append(
                    f"run {run} {table}.lance: {len(old)} intermediate versions, {len(orphans)} uncommitted data files"
                )
                if not dry_run:  # snapshot versions are tagged complete-N; Lance keeps tagged versions
                    ds.cleanup_old_versions(
                        older_than=timedelta(0), delete_unverified=True, error_if_tagged_old_versions=False
                    )
                    if m.checksums_from is not None:  # the removed files' checksums go too
                        checksums.merge(lake.storage, run, table, keep=used)
    if not dry_run and removed:
        lake.sync()
    return removed
