"""``lake explain``: one short explanation per feature, written by a chat model from its examples.

The explainer sees the feature's top examples and a few from each activation interval (the
interval samples that are not top examples), each an excerpt around its peak with the
activating tokens marked «like this», and the tokens the feature promotes most. What it saw is
recorded with the explanation (context ids and kinds of the examples, the promoted tokens, the
prompt's sha256, the explainer and its model), so ``lake score`` can test it on other examples.
Features already explained are skipped unless ``overwrite``: an interrupted run continues.
Explanations are written to the store every ``CHUNK`` features.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass

from saelake.lake import Lake, UserError

from .excerpts import excerpt, marked_positions
from .explanations import check_text, explanation_store, now
from .llm import ChatModel, chat_model
from .selection import parse_features

CHUNK = 8
DEFAULT_FEATURES = 100  # explained when --features is not given
SYSTEM = (
    "You are an interpretability researcher. You read text excerpts on which one neuron of a language model "
    "fires and say briefly what the neuron detects."
)
MAX_EXPLANATION = 200


@dataclass
class ExplainConfig:
    lake: str | None
    sae: str
    analysis: str | None = None
    store: str | None = None
    features: str | None = None  # default: the first 100
    explainer: str = "local"
    model: str | None = None
    api_key_env: str | None = None
    n_top: int = 10  # top examples shown
    n_interval: int = 2  # examples shown from each interval
    max_tokens: int = 32
    overwrite: bool = False
    timeout_s: float = 120.0

    def __post_init__(self):
        for name in ("n_top", "max_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('n_', '').replace('_', '-')} must be positive")
        if self.n_interval < 0:
            raise UserError("--interval-examples must be >= 0")


@dataclass
class ExplainResult:
    analysis: str
    explained: int
    skipped_dead: int
    skipped_done: int
    seconds: float
    explainer: str
    model: str

    @property
    def seconds_per_feature(self) -> float:
        return self.seconds / self.explained if self.explained else 0.0


def chosen_examples(row: dict, n_top: int, n_interval: int) -> list[dict]:
    """The samples the explainer sees: top ones, then up to ``n_interval`` of each interval (not top)."""
    samples = [s for s in row.get("samples") or [] if s["acts"]]
    top = [s for s in samples if s["kind"] == "top"][:n_top]
    seen = {s["context_id"] for s in top}
    out = list(top)
    for j in sorted({s["interval"] for s in samples if s["kind"] == "interval"}):
        picked = [s for s in samples if s["kind"] == "interval" and s["interval"] == j and s["context_id"] not in seen]
        out += picked[:n_interval]
        seen.update(s["context_id"] for s in picked[:n_interval])
    return out


def prompt(row: dict, examples: list[dict], skip_ids: set[int]) -> list[dict]:
    lines = [f"{k + 1}. {excerpt(s, skip_ids, marked_positions(s))}" for k, s in enumerate(examples)]
    promoted = ", ".join(json.dumps(t) for t in (row.get("pos_strs") or [])[:10])
    user = (
        "Text excerpts where the neuron fires; the tokens it fires on are marked «like this»:\n"
        + "\n".join(lines)
        + (f"\n\nTokens the neuron makes more likely to come next: {promoted}" if promoted else "")
        + "\n\nIn one short phrase (at most 12 words), what does the neuron detect? Answer with the phrase only."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def clean(text: str) -> str | None:
    """The model's answer as an explanation: its first non-empty line, without a label or quotes."""
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    line = re.sub(r"^(explanation|answer)\s*[:\-]\s*", "", line, flags=re.I)
    line = re.sub(
        r"^(the|this|it|a) (neuron|feature)?\s*(detects|fires on|responds to|is)\s*(that\s+)?[:\-]?\s*",
        "",
        line,
        flags=re.I,
    )
    line = line.replace("«", "").replace("»", "").strip(" \"'`*")
    return check_text(line[:MAX_EXPLANATION], "explanation")


def explain_feature(
    chat: ChatModel, row: dict, skip_ids: set[int], n_top: int, n_interval: int, max_tokens: int
) -> dict | None:
    """The explanation row of one feature (None: it never fired, nothing to explain)."""
    examples = chosen_examples(row, n_top, n_interval)
    if not examples:
        return None
    messages = prompt(row, examples, skip_ids)
    text = clean(chat.complete(messages, max_tokens))
    return {
        "explanation": text,
        "explainer": chat.explainer,
        "explainer_model": chat.model,
        "examples": [int(s["context_id"]) for s in examples],
        "example_kinds": [s["kind"] for s in examples],
        "promoted": list((row.get("pos_strs") or [])[:10]),
        "prompt_sha256": hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest(),
        "explained_at": now(),
    }


def feature_rows(store, rec, features: list[int], chunk: int = 64):
    """Feature rows of an analysis, ``chunk`` at a time (point reads, not one scan per feature)."""
    from .stores import EmbeddedStore

    for i in range(0, len(features), chunk):
        part = features[i : i + chunk]
        if isinstance(store, EmbeddedStore):
            ds = store.dataset(rec.name, rec)
            rows = ds.take(part).to_pylist() if max(part) < ds.count_rows() else []
            if [r["feature"] for r in rows] != part:  # rows are not in feature order: filter instead
                flt = f"feature IN ({','.join(map(str, part))})"
                rows = sorted(ds.to_table(filter=flt).to_pylist(), key=lambda r: r["feature"])
        else:
            rows = list(
                store.db.features.find(
                    {"analysis": rec.name, "feature": {"$in": part}}, {"_id": 0, "sae": 0, "analysis": 0}
                ).sort("feature", 1)
            )
        yield from rows


def explain(cfg: ExplainConfig, progress: bool = True) -> ExplainResult:
    from tqdm import tqdm

    from .cli import find_analysis

    store, rec = find_analysis(cfg.lake, cfg.store, cfg.sae, cfg.analysis)
    features = parse_features(cfg.features or f"0-{min(rec.n_features, DEFAULT_FEATURES) - 1}", rec.n_features)
    expl_store = explanation_store(
        Lake(cfg.lake) if cfg.lake else None, rec, mongo=None if rec.store == "embedded" else store
    )
    done = {} if cfg.overwrite else expl_store.rows(rec.name, features)
    todo = [f for f in features if not (done.get(f) or {}).get("explanation")]
    chat = chat_model(cfg.explainer, cfg.model, cfg.api_key_env, cfg.timeout_s)
    skip = set(rec.excluded_token_ids)
    t0, pending, explained, dead = time.perf_counter(), {}, 0, 0
    bar = tqdm(total=len(todo), desc=f"explain {rec.name}", unit="feature", disable=not progress)
    for row in feature_rows(store, rec, todo):
        out = explain_feature(chat, row, skip, cfg.n_top, cfg.n_interval, cfg.max_tokens)
        if out is None:
            dead += 1
        else:
            pending[row["feature"]] = out
        if len(pending) >= CHUNK:
            expl_store.update(rec.name, rec.sae, pending)
            explained += len(pending)
            pending = {}
        bar.update(1)
    bar.close()
    if pending:
        expl_store.update(rec.name, rec.sae, pending)
        explained += len(pending)
    return ExplainResult(
        rec.name, explained, dead, len(features) - len(todo), time.perf_counter() - t0, chat.explainer, chat.model
    )


def import_explanations(
    lake_uri: str | None, store_uri: str | None, sae: str, analysis: str | None, path: str
) -> tuple[str, int]:
    """``lake explain --import FILE``: a JSON list of {"feature", "explanation", "note"?, "explainer"?, "model"?}
    or an object {feature: explanation}. Checked whole before anything is written."""
    from .cli import find_analysis

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read --import {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"--import {path} is not JSON ({e})") from None
    if isinstance(data, dict):
        data = [{"feature": k, "explanation": v} for k, v in data.items()]
    if not isinstance(data, list):
        raise UserError(f'--import {path}: give a JSON list of {{"feature", "explanation"}} objects')
    store, rec = find_analysis(lake_uri, store_uri, sae, analysis)
    changes: dict[int, dict] = {}
    for k, item in enumerate(data):
        where = f"--import {path}: item {k}"
        if not isinstance(item, dict):
            raise UserError(f"{where} is not an object")
        unknown = set(item) - {"feature", "explanation", "note", "explainer", "model"}
        if unknown:
            raise UserError(
                f"{where}: unknown key {sorted(unknown)[0]!r} (keys: feature, explanation, note, explainer, model)"
            )
        try:
            f = int(item.get("feature"))
        except (TypeError, ValueError):
            raise UserError(f"{where}: feature must be an integer") from None
        if not 0 <= f < rec.n_features:
            raise UserError(f"{where}: feature {f} is out of range (features 0..{rec.n_features - 1})")
        ch = {"explanation": check_text(item.get("explanation"), f"{where}: explanation")}
        if ch["explanation"]:
            ch |= {
                "explainer": str(item.get("explainer") or f"import:{path.rsplit('/', 1)[-1]}")[:200],
                "explainer_model": str(item["model"])[:200] if item.get("model") else None,
                "examples": [],
                "example_kinds": [],
                "promoted": [],
                "prompt_sha256": None,
                "explained_at": now(),
            }
        if "note" in item:
            ch["note"] = check_text(item["note"], f"{where}: note")
        changes[f] = ch
    expl_store = explanation_store(
        Lake(lake_uri) if lake_uri else None, rec, mongo=None if rec.store == "embedded" else store
    )
    expl_store.update(rec.name, rec.sae, changes)
    return rec.name, len(changes)
