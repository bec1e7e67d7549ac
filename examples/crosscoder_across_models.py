"""A crosscoder across two models (checkpoints of one model, or a model and its fine-tune): the same
tokens through both, one dictionary reading and writing both, and which features one model has alone.

    python examples/crosscoder_across_models.py --lake ./lake-demo --models a=PATH,b=PATH

Without --models: the bundled SmolLM2-135M against a stand-in "checkpoint" of it whose layer-3 MLP
weights are perturbed (written once next to the model cache). Prints each feature's share of decoder norm
in model b: near 0 = a only, near 1 = b only. For a tiny run: --models a=DIR1,b=DIR2 --dataset FILE
--hook blocks.1.hook_resid_post --ingest-tokens 2000 --tokens 4096 --batch-size 256 --context-size 32
--expansion 2 --k 4."""

import argparse
import time

import torch

from saelake import lake
from saelake.analyze import AnalyzeConfig, analyze
from saelake.analyze.stores import EmbeddedStore
from saelake.lake.models import resolve_model
from saelake.lake.storage import saelake_home
from saelake.train import SAEConfig, train


def stand_in_checkpoint(layer: int = 3, noise: float = 0.5) -> str:
    """The bundled model with its layer-``layer`` MLP output weights perturbed (once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = saelake_home() / "models" / f"smollm2-135m-mlp{layer}-perturbed"
    if not (target / "config.json").exists():
        base = resolve_model("smollm2-135m")[0]
        model = AutoModelForCausalLM.from_pretrained(base)
        w = model.model.layers[layer].mlp.down_proj.weight
        with torch.no_grad():
            w += noise * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
        model.save_pretrained(target)
        AutoTokenizer.from_pretrained(base).save_pretrained(target)
    return str(target)


p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--models", default=None, help="a=PATH,b=PATH (default: bundled vs a perturbed stand-in)")
p.add_argument("--dataset", default="builtin")
p.add_argument("--hook", default="blocks.5.hook_resid_post")
p.add_argument("--run", default=None, help="snapshot run (default: xmodels)")
p.add_argument("--ingest-tokens", type=int, default=20_000)
p.add_argument("--tokens", type=int, default=60_000)
p.add_argument("--batch-size", type=int, default=1024)
p.add_argument("--context-size", type=int, default=128)
p.add_argument("--expansion", type=float, default=2, help="latents = expansion x (d_model of both models)")
p.add_argument("--k", type=int, default=32)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--name", default=None)
args = p.parse_args()

models = args.models or f"a={resolve_model('smollm2-135m')[0]},b={stand_in_checkpoint()}"
run = args.run or "xmodels"
hooks = [f"a:{args.hook}", f"b:{args.hook}"]
if run not in lake.Lake(args.lake).run_names():  # the same tokens through both models, aligned columns
    lake.ingest(
        lake.IngestConfig(
            lake=args.lake,
            model=models,
            dataset=args.dataset,
            hooks=[args.hook],
            tokens=args.ingest_tokens,
            context_size=args.context_size,
            run=run,
        )
    )
name = args.name or f"xmodels-{time.strftime('%Y%m%d-%H%M%S')}"
sae = SAEConfig(hooks=hooks, arch="topk", name=name, k=args.k, expansion=args.expansion, lr=args.lr)
cfg = train(args.lake, [sae], run=run, tokens=args.tokens, batch_size=args.batch_size, repeat=True)[0]
per_model = cfg["holdout"].get("fvu_per_hook") or cfg["final_metrics"]["fvu_per_hook"]
print(
    f"sae {name}: crosscoder over {', '.join(hooks)}, d_sae {cfg['d_sae']}, FVU "
    + ", ".join(f"{h} {v:.3f}" for h, v in per_model.items())
)
rec = analyze(
    AnalyzeConfig(lake=args.lake, sae=name, tokens=min(args.ingest_tokens, 20_000), n_neighbours=0), progress=False
)
table = EmbeddedStore(lake.Lake(args.lake)).dataset(rec.name).to_table(columns=["count", "decoder_norms"])
norms = torch.tensor(table.column("decoder_norms").to_pylist())[torch.tensor(table.column("count").to_pylist()) > 0]
share = norms[:, 1] / norms.sum(1).clamp_min(1e-12)  # each live feature's share of decoder norm in model b
hist = torch.histc(share, bins=5, min=0, max=1).int().tolist()
print(f"{len(share)} live features by decoder-norm share in model b (0-0.2 ... 0.8-1): {hist}")
print(f"  a only (< 0.2): {int((share < 0.2).sum())}, b only (> 0.8): {int((share > 0.8).sum())}")
print(f"next: lake feature --lake {args.lake} {name} N  (decoder norm per model);  lake serve --lake {args.lake}")
