"""Explain and score an SAE's features with a local chat model, then search them.

    python examples/explain.py --lake ./lake-demo --sae NAME [--features 0-19]

The SAE needs an analysis (`lake analyze NAME`); without --sae a small TopK SAE is trained and
analysed live first. The explainer and scorer default to the bundled SmolLM2-135M-Instruct:
real and offline, but a 135M model writes weak explanations and scores near chance (0.5); point
--explainer at an OpenAI-compatible server (http://host:port/v1, --model NAME) for useful ones.
Tiny: --model DIR --dataset FILE --hook blocks.0.hook_resid_post --context-size 32 --tokens 640
--train-tokens 2048 --train-batch-size 256 --expansion 2 --k 4 --explainer-model DIR.
"""

import argparse
import time

from saelake.analyze import AnalyzeConfig, EmbeddedStore, analyze
from saelake.analyze.explain import ExplainConfig, explain
from saelake.analyze.explanations import EmbeddedExplanations
from saelake.analyze.labels import label, token_summaries
from saelake.analyze.score import ScoreConfig, score
from saelake.lake import Lake

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lake", default="./lake-demo")
p.add_argument("--sae", default=None, help="an analysed SAE in the lake (default: train and analyse one live)")
p.add_argument("--features", default=None, help="features to explain (default: the first 5 that fired)")
p.add_argument("--explainer", default="local", help="local or http://host:port/v1")
p.add_argument("--explainer-model", default=None, help="local: a model folder (default: smollm2-135m)")
p.add_argument("--model", default="smollm2-135m", help="the language model (training and analysis)")
p.add_argument("--dataset", default="builtin")
p.add_argument("--hook", default="blocks.3.hook_resid_post")
p.add_argument("--context-size", type=int, default=128)
p.add_argument("--tokens", type=int, default=8192, help="tokens to analyze")
p.add_argument("--train-tokens", type=int, default=8192)
p.add_argument("--train-batch-size", type=int, default=1024)
p.add_argument("--expansion", type=float, default=4)
p.add_argument("--k", type=int, default=32)
args = p.parse_args()

lake = Lake(args.lake)
sae = args.sae
if sae is None:
    from saelake.train import SAEConfig, train

    sae = f"topk-explain-{time.strftime('%Y%m%d-%H%M%S')}"
    train(
        args.lake,
        [SAEConfig(hooks=[args.hook], arch="topk", name=sae, expansion=args.expansion, k=args.k)],
        live=True,
        model=args.model,
        dataset=args.dataset,
        context_size=args.context_size,
        tokens=args.train_tokens,
        batch_size=args.train_batch_size,
        progress=False,
    )
    analyze(
        AnalyzeConfig(
            lake=args.lake,
            sae=sae,
            live=True,
            model=args.model,
            dataset=args.dataset,
            context_size=args.context_size,
            tokens=args.tokens,
            name=sae,
        ),
        progress=False,
    )
    print(f"trained and analysed {sae}")

store = EmbeddedStore(lake)
rec = max(store.records(sae), key=lambda r: r.created)
features = args.features or ",".join([str(r["feature"]) for r in store.scalars(rec.name) if r["count"] > 0][:5])

# 1. explanations: the explainer reads top and interval examples with the activating tokens marked
r = explain(
    ExplainConfig(
        lake=args.lake,
        sae=sae,
        analysis=rec.name,
        features=features,
        explainer=args.explainer,
        model=args.explainer_model,
    ),
    progress=False,
)
print(f"explained {r.explained} features in {r.seconds:.1f} s ({r.seconds_per_feature:.2f} s per feature)")

# 2. scores: can the scorer, told the explanation, pick held-out activating contexts / marked tokens?
s = score(
    ScoreConfig(
        lake=args.lake, sae=sae, analysis=rec.name, features=features, scorer=args.explainer, model=args.explainer_model
    ),
    progress=False,
)
fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
print(f"scored {s.scored} features: mean detection {fmt(s.mean_detection)}, mean fuzzing {fmt(s.mean_fuzzing)}")

# 3. the labels, as `lake features` and the web UI show them
rows = EmbeddedExplanations(lake).rows(rec.name)
sums = token_summaries(lake, rec)
for f in sorted(rows):
    text, source = label(rows[f], sums.get(f))
    print(f"  feature {f:5d}  det {fmt(rows[f]['detection'])}  fuzz {fmt(rows[f]['fuzzing'])}  [{source}] {text}")
print(f"next: lake features --lake {args.lake} {sae} --search WORD   |   lake serve --lake {args.lake}")
