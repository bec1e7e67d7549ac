"""Steer the model with an SAE feature: add it, clamp it or ablate it, and compare continuations.

    python examples/steer.py --lake ./lake-demo --sae NAME [--feature F] [--value V] [--prompt TEXT]

Without --feature it picks a feature from the SAE's analysis (`lake analyze` first): of the sparse ones
(density 0.1-5%) whose max activation is not an outlier (at most 3 x the median feature's: massive-
activation tokens make a few huge), the one with the largest mean activation. --value defaults to
four times that feature's max activation in the analysis. Runs the same code as `lake steer` (and the
web UI's steering box): ``saelake.analyze.Splice`` / ``Edit`` / ``generate``.
"""

import argparse
import statistics

import torch

from saelake.analyze import Edit, EmbeddedStore, Splice, generate
from saelake.analyze.steer import format_text, model_spec, steer
from saelake.lake import Lake, load_model
from saelake.train import load_sae

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--sae", required=True)
p.add_argument("--feature", type=int, default=None)
p.add_argument("--value", type=float, default=None)
p.add_argument("--prompt", default="I went to the store and")
p.add_argument("--tokens", type=int, default=20)
p.add_argument("--model", default=None, help="default: the SAE's")
args = p.parse_args()

lake = Lake(args.lake)
sae, cfg = load_sae(args.lake, args.sae)
lm = load_model(model_spec(lake, cfg, args.model))
feature, value = args.feature, args.value
if feature is None or value is None:
    store = EmbeddedStore(lake)
    alive = [r for r in store.scalars(args.sae) if r["count"] > 0]
    median = statistics.median(r["max_act"] for r in alive) if alive else 0.0
    rows = [r for r in alive if 0.001 < r["density"] < 0.05 and r["max_act"] <= 3 * median]
    if not rows:
        raise SystemExit(
            f"no analysis of {args.sae} with sparse features: run `lake analyze --lake {args.lake} "
            f"{args.sae}` first, or pass --feature and --value"
        )
    pick = (
        max(rows, key=lambda r: r["mean_act"])
        if feature is None
        else next(r for r in store.scalars(args.sae) if r["feature"] == feature)
    )
    feature = pick["feature"] if feature is None else feature
    value = 4 * pick["max_act"] if value is None else value
print(f"feature {feature}, value {value:.3g}")

# 1. the API: a splice with one edit, applied at every position while generating (greedy)
ids = [lm.bos_token_id] + lm.tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
for mode in ("add", "clamp", "ablate"):
    splice = Splice(lm, sae, [Edit(feature, mode, value)])
    new = generate(lm, ids, args.tokens, splice)
    print(f"{mode:>6}: {args.prompt}{lm.tokenizer.decode(new)!r}")
plain = generate(lm, ids, args.tokens)
print(f"{'plain':>6}: {args.prompt}{lm.tokenizer.decode(plain)!r}")
with torch.no_grad():  # with no edit and the error term kept, the spliced model is the model
    toks = torch.tensor([ids])
    same = Splice(lm, sae).logits(toks) - lm.bridge(toks, return_type="logits").float()
print(f"splice without edits, error term kept: max |logit change| {float(same.abs().max()):.2e}")

# 2. what `lake steer` prints: both continuations and the promoted tokens' log-prob changes
print()
print(format_text(steer(lake, args.sae, args.prompt, feature, value, tokens=args.tokens, model=lm, sae=(sae, cfg))))
