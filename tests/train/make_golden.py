"""Write the golden fixtures under tests/data/ (run by hand, from the repo root):

    .venv/bin/python -m tests.train.make_golden            # tests/data/golden/steps.safetensors
    .venv/bin/python -m tests.train.make_golden --legacy   # tests/data/legacy-0097db9/

``steps.safetensors`` (read by tests/train/test_golden.py): real activations of the tiny test model
(ingested into a temporary lake, normalised per hook as the trainer does, ``STEPS`` batches of
``BATCH`` tokens per hook), and each case's member state after replaying them through
``test_golden.replay``. It was recorded with the code of commit 0097db9; regenerate it only when a
change of numbers is intended, and say so in the commit.

``--legacy`` writes SAEs the way the code of the checkout trains and saves them (config.json +
weights.safetensors, as under ``<lake>/saes/<name>/``) plus the outputs of the loaded SAEs on raw
activations (``expected.safetensors``). It was run at commit 0097db9, so that tests can check that
SAEs written by that code still load and give the same outputs; running it again later would record
the new code instead, which defeats the purpose.

Both use one torch thread, so the numbers do not depend on the machine's core count.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path

import lance
import torch
from safetensors.torch import save_file

from tests.conftest import TEXT, make_tiny_model
from tests.train.test_golden import BATCH, CASES, D_MODEL, GOLDEN, H0, H1, MLP_IN, MLP_OUT, STEPS, replay

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy-0097db9"
HOOKS = [H0, H1, MLP_IN, MLP_OUT]


def tiny_lake(tmp: Path) -> str:
    """The train tests' snapshot: run r1, the tiny model's 4 hooks, ~4k tokens, 1d + 2d."""
    import os

    from saelake.lake import IngestConfig, ingest

    os.environ.setdefault("SAELAKE_HOME", str(tmp / "home"))
    model = make_tiny_model(tmp / "tiny-gpt2")
    root = str(tmp / "lake")
    ingest(
        IngestConfig(
            lake=root,
            model=str(model),
            dataset=str(TEXT),
            hooks=HOOKS,
            tokens=4000,
            context_size=32,
            layouts=["1d", "2d"],
            run="r1",
        ),
        progress=False,
    )
    return root


def raw_rows(lake: str, hook: str, n: int, offset: int = 0) -> torch.Tensor:
    """The first rows of a hook's column in tokens.lance, as float32 [n, d]."""
    from saelake.lake import SnapshotSource

    src = SnapshotSource(lake, "r1")
    col = lance.dataset(src.lake.table_uri("r1", "tokens")).to_table(columns=[src.columns[hook]]).column(0)
    col = col.combine_chunks().slice(offset, n)
    return torch.from_numpy(col.flatten().to_numpy().reshape(n, -1).copy()).float()


def golden(lake: str) -> None:
    from saelake.lake import SnapshotSource

    stats = SnapshotSource(lake, "r1").manifest.stats
    acts = {}
    for h in HOOKS:
        scale = math.sqrt(D_MODEL[h]) / stats[h].mean_norm  # the trainer's dataset normalisation
        rows = raw_rows(lake, h, STEPS * BATCH) * scale
        for s in range(STEPS):
            acts[f"input.{h}.{s}"] = rows[s * BATCH : (s + 1) * BATCH].contiguous()
    out = dict(acts)
    for case in CASES:
        out |= replay(case, acts)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(GOLDEN))
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes, {len(out)} tensors)")


LEGACY_SAES = {
    "topk": dict(arch="topk", hooks=[H1], k=8),
    "batchtopk": dict(arch="batchtopk", hooks=[H1], k=8),
    "relu": dict(arch="relu", hooks=[H1], l1=0.5),
    "jumprelu": dict(arch="jumprelu", hooks=[H1], l1=0.05),
    "transcoder": dict(arch="topk", hooks=[MLP_IN], out_hooks=[MLP_OUT], k=8),
    "crosscoder": dict(arch="batchtopk", hooks=[H0, H1], k=8),
}


def legacy(lake: str) -> None:
    from saelake.train import SAEConfig, load_sae, train

    cfgs = [SAEConfig(name=name, expansion=2, lr=3e-3, **kw) for name, kw in LEGACY_SAES.items()]
    train(lake, cfgs, run="r1", tokens=2048, batch_size=256, progress=False)
    if LEGACY.exists():
        shutil.rmtree(LEGACY)
    expected = {}
    for name in LEGACY_SAES:
        dst = LEGACY / "saes" / name
        dst.mkdir(parents=True)
        for f in ("config.json", "weights.safetensors"):
            shutil.copy(Path(lake) / "saes" / name / f, dst / f)
        sae, cfg = load_sae(lake, name)
        x = torch.cat([raw_rows(lake, h, BATCH, offset=1000) for h in cfg["hooks"]], -1)
        with torch.no_grad():
            codes = sae.encode(x)
            expected[f"{name}.x"] = x
            expected[f"{name}.codes"] = codes.dense()[0].contiguous()
            expected[f"{name}.y_hat"] = sae.decode(codes)[0].contiguous()
    save_file(expected, str(LEGACY / "expected.safetensors"))
    size = sum(p.stat().st_size for p in LEGACY.rglob("*") if p.is_file())
    print(f"wrote {LEGACY} ({size} bytes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--legacy", action="store_true", help="write tests/data/legacy-0097db9/ instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        lake = tiny_lake(Path(tmp))
        legacy(lake) if args.legacy else golden(lake)


if __name__ == "__main__":
    main()
