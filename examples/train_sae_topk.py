"""Train a topk SAE live: the model runs over the corpus and feeds the trainer (no cache).

    python examples/train_sae_topk.py --lake ./lake-demo

About a minute at the defaults on the bundled SmolLM2-135M (2 CPU cores). For a tiny run:
--model DIR --dataset FILE --tokens 2048 --batch-size 256 --context-size 32 --expansion 2."""

from live_training import main

main("topk", __doc__.splitlines()[0])
