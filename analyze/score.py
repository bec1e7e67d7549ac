"""``lake score``: how well an explanation predicts its feature, as two balanced accuracies.

Both use examples the explainer did not see (the context ids recorded with the explanation).

- **detection**: the scorer gets the explanation and one excerpt at a time, activating (held-out
  top and interval samples) or not (the feature's non-activating samples), and answers whether
  the feature fires on it.
- **fuzzing**: the scorer gets the explanation and a held-out activating excerpt whose marked
  tokens («») are either the ones the feature fires on or as many other tokens of the excerpt
  (picked with a generator seeded by the feature), and answers whether the marks fit.

Balanced accuracy is the mean of the accuracy on each class, so an always-"yes" scorer gets 0.5;
an answer that is neither yes nor no counts as wrong. A score is None when a class is empty
(a feature without held-out or non-activating examples).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from saelake.lake import Lake, UserError

from .excerpts import decoy_marks, excerpt, marked_positions
from .explain import CHUNK, feature_rows
from .explanations import explanation_store, now
from .llm import ChatModel, chat_model
from .selection import parse_features

SYSTEM = "You check descriptions of what a neuron in a language model detects. Answer Yes or No only."


@dataclass
class ScoreConfig:
    lake: str | None
    sae: str
    analysis: str | None = None
    store: str | None = None
    features: str = "all"
    scorer: str = "local"
    model: str | None = None
    api_key_env: str | None = None
    n_examples: int = 10  # at most this many of each class
    overwrite: bool = False
    timeout_s: float = 120.0

    def __post_init__(self):
        if self.n_examples < 1:
            raise UserError("--examples must be positive")


@dataclass
class ScoreResult:
    analysis: str
    scored: int
    skipped: int
    seconds: float
    mean_detection: float | None
    mean_fuzzing: float | None
    unscorable: int  # scored features without held-out or non-activating examples (their scores are None)


def balanced_accuracy(pos: list[bool | None], neg: list[bool | None]) -> float | None:
    """Mean of the accuracy on positives (answered yes) and on negatives (answered no)."""
    if not pos or not neg:
        return None
    return 0.5 * (sum(a is True for a in pos) / len(pos) + sum(a is False for a in neg) / len(neg))


def held_out(row: dict, shown: set[int], n: int) -> tuple[list[dict], list[dict]]:
    """(activating samples the explainer did not see, non-activating samples), at most ``n`` each."""
    samples = row.get("samples") or []
    seen, pos = set(shown), []
    for s in sorted((s for s in samples if s["acts"]), key=lambda s: (s["kind"] != "interval", s["interval"])):
        if s["context_id"] not in seen:  # interval samples first: the whole range, not only the strongest
            pos.append(s)
            seen.add(s["context_id"])
    neg = [s for s in samples if not s["acts"] and s["kind"] == "zero"]
    return pos[:n], neg[:n]


def _ask(chat: ChatModel, explanation: str, text: str, question: str) -> bool | None:
    user = f"Description of the neuron: {explanation}\n\nText: {text}\n\n{question} Answer Yes or No."
    return chat.yes_no([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])


def score_feature(chat: ChatModel, row: dict, expl: dict, skip_ids: set[int], n: int) -> dict:
    pos, neg = held_out(row, set(expl.get("examples") or []), n)
    text = expl["explanation"]
    q_detect = "Does the neuron fire on this text?"
    detection = balanced_accuracy(
        [_ask(chat, text, excerpt(s, skip_ids), q_detect) for s in pos],
        [_ask(chat, text, excerpt(s, skip_ids), q_detect) for s in neg],
    )
    rng = random.Random(int(row["feature"]))
    q_fuzz = "The tokens marked «like this» are where the neuron fires. Do the marked tokens fit the description?"
    right = [_ask(chat, text, excerpt(s, skip_ids, marked_positions(s)), q_fuzz) for s in pos]
    decoys = [(s, decoy_marks(s, skip_ids, rng)) for s in pos]
    wrong = [_ask(chat, text, excerpt(s, skip_ids, m), q_fuzz) for s, m in decoys if m]
    return {
        "detection": detection,
        "fuzzing": balanced_accuracy(right, wrong),
        "scorer": chat.explainer,
        "scorer_model": chat.model,
        "score_examples": [int(s["context_id"]) for s in pos + neg],
        "scored_at": now(),
    }


def score(cfg: ScoreConfig, progress: bool = True) -> ScoreResult:
    from tqdm import tqdm

    from .cli import find_analysis

    store, rec = find_analysis(cfg.lake, cfg.store, cfg.sae, cfg.analysis)
    features = parse_features(cfg.features, rec.n_features)
    expl_store = explanation_store(
        Lake(cfg.lake) if cfg.lake else None, rec, mongo=None if rec.store == "embedded" else store
    )
    rows = expl_store.rows(rec.name, features)
    todo = [
        f
        for f in features
        if (rows.get(f) or {}).get("explanation") and (cfg.overwrite or rows[f].get("scored_at") is None)
    ]
    if not todo and not any((rows.get(f) or {}).get("explanation") for f in features):
        raise UserError(
            f"no explained features among --features {cfg.features} of analysis {rec.name!r}: "
            f"run `lake explain {cfg.sae}` first"
        )
    chat = chat_model(cfg.scorer, cfg.model, cfg.api_key_env, cfg.timeout_s)
    skip = set(rec.excluded_token_ids)
    t0, pending, results = time.perf_counter(), {}, []
    bar = tqdm(total=len(todo), desc=f"score {rec.name}", unit="feature", disable=not progress)
    for row in feature_rows(store, rec, todo):
        out = score_feature(chat, row, rows[row["feature"]], skip, cfg.n_examples)
        pending[row["feature"]] = out
        results.append(out)
        if len(pending) >= CHUNK:
            expl_store.update(rec.name, rec.sae, pending)
            pending = {}
        bar.update(1)
    bar.close()
    if pending:
        expl_store.update(rec.name, rec.sae, pending)
    mean = lambda k: (sum(v) / len(v)) if (v := [r[k] for r in results if r[k] is not None]) else None  # noqa: E731
    return ScoreResult(
        rec.name,
        len(results),
        len(features) - len(todo),
        time.perf_counter() - t0,
        mean("detection"),
        mean("fuzzing"),
        sum(r["detection"] is None for r in results),
    )
