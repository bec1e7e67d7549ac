"""What several benchmarks share: cached snapshots of the bundled model, and held-out text."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CACHE = Path.home() / ".cache" / "saelake-bench"


def ensure_run(lake: str, run: str, *, model: str, dataset: str, hook: str, tokens: int, context_size: int, dtype: str):
    """Ingest ``run`` (1d only) unless the lake has it complete; an interrupted one is resumed."""
    from saelake.lake import IngestConfig, Lake, ingest

    lk = Lake(lake)
    if run in lk.run_names() and lk.manifest(run).status == "complete":
        return
    print(f"ingesting {run} ({tokens:,} tokens, {dtype}) ...", flush=True)
    ingest(
        IngestConfig(
            lake=lake,
            model=model,
            dataset=dataset,
            hooks=[hook],
            tokens=tokens,
            context_size=context_size,
            layouts=["1d"],
            dtype=dtype,
            run=run,
            resume=run in lk.run_names(),
        ),
        progress=True,
    )


def heldout_text(dataset: str) -> str:
    """A corpus path for the held-out rows. Debian's licence files have no extension: they are
    copied once as ``.txt`` documents under the bench cache."""
    held = Path(dataset)
    if not held.is_dir() or any(f.suffix == ".txt" for f in held.iterdir()):
        return dataset
    copy = CACHE / "heldout-text"
    copy.mkdir(parents=True, exist_ok=True)
    for f in held.iterdir():
        if f.is_file():
            (copy / f"{f.name}.txt").write_bytes(f.read_bytes())
    return str(copy)


def storage_rows(lake: str, run: str, hook: str, acts: bool = True):
    """(the 1d table's activations in storage order as float32 or None, their (context, position) keys)."""
    from saelake.lake import SnapshotSource
    from saelake.lake.tables import arrow_to_acts

    src = SnapshotSource(lake, run)
    ds = src.lake.dataset(run, "tokens", src.snapshot.tables["tokens"])
    t = ds.to_table(columns=["context_id", "position"] + ([src.columns[hook]] if acts else []))
    keys = t.column("context_id").to_numpy() * 100_000 + t.column("position").to_numpy().astype(np.int64)
    if not acts:
        return None, keys
    return arrow_to_acts(t.column(src.columns[hook]), src.codecs[hook], (src.d_model[hook],)).float(), keys
