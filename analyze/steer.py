"""``lake steer``: a prompt's continuation with and without a feature edit, side by side, and how
the edit moves the next-token log-probabilities of the tokens the feature promotes.

``steer()`` is what the CLI and the web UI's steering box call (the UI passes its loaded model, so
the model loads once). Registered through the ``saelake.commands`` entry point.
"""

from __future__ import annotations

import json
import math
import textwrap

import click
import torch

from saelake.lake import Lake, UserError

from .directions import token_strings
from .interventions import MODES, Edit, Splice, check_length, generate, promoted_tokens

MAX_TOKENS = 200  # new tokens per continuation (CPU: one forward pass each)


def model_spec(lake: Lake, cfg: dict, override: str | None = None) -> str:
    """The model an SAE was made on: ``override``, else its config's, else its run's."""
    spec = override or cfg.get("model")
    if not spec and cfg.get("run"):
        spec = lake.manifest(cfg["run"]).model
    if not spec:
        raise UserError(f"SAE {cfg.get('name')!r} does not name its model: pass --model")
    return spec


def parse_positions(value: str | None) -> tuple[int, ...] | None:
    """``all`` (None) or comma-separated prompt token indices (0 = first token after BOS, -1 = last)."""
    if value is None or value.strip().lower() == "all":
        return None
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--positions takes 'all' or token indices like 0,3,-1, got {value!r}") from None
    if not out:
        raise UserError("--positions is empty: give 'all' or token indices like 0,-1")
    return out


def _absolute(positions: tuple[int, ...] | None, n_prompt: int) -> tuple[int, ...] | None:
    """Prompt token indices (BOS excluded; negative from the end) -> sequence indices (BOS is 0)."""
    if positions is None:
        return None
    out = []
    for p in positions:
        if not -n_prompt <= p < n_prompt:
            raise UserError(
                f"position {p} is outside the prompt: it has {n_prompt} tokens (0..{n_prompt - 1}, "
                f"or -1..-{n_prompt} from the end)"
            )
        out.append(1 + (p % n_prompt))
    return tuple(sorted(set(out)))


@torch.no_grad()
def steer(
    lake: Lake | str,
    sae_name: str,
    prompt: str,
    feature: int,
    value: float,
    *,
    mode: str = "add",
    tokens: int = 20,
    positions: tuple[int, ...] | None = None,
    keep_error: bool = True,
    model=None,
    sae=None,
    temperature: float = 0.0,
    seed: int = 0,
    top: int = 10,
) -> dict:
    """Baseline and steered continuations of ``prompt`` and the change in the next-token
    log-probabilities of the feature's ``top`` promoted tokens. ``model``: a spec or a loaded
    ``LoadedModel``; ``sae``: an already loaded (dictionary, config) pair."""
    from saelake.lake import load_model
    from saelake.train.store import SAEStore

    lake = lake if isinstance(lake, Lake) else Lake(lake)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"--value must be a finite number, got {value!r}")
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")
    if not 0 <= tokens <= MAX_TOKENS:
        raise UserError(f"--tokens must be in 0..{MAX_TOKENS}, got {tokens}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty: give some text with --prompt")
    dictionary, cfg = sae if sae is not None else SAEStore(lake).load(sae_name)
    Edit(feature, mode, float(value)).check(dictionary.d_sae)  # before loading a model
    lm = model if model is not None and not isinstance(model, str) else load_model(model_spec(lake, cfg, model))
    ids = [lm.bos_token_id] + list(lm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    check_length(lm, len(ids), tokens)
    at = _absolute(positions, len(ids) - 1)
    edit = Edit(feature, mode, float(value), at)
    splice = Splice(lm, dictionary, [edit], keep_error=keep_error)
    prompt_t = torch.tensor([ids])
    plain = lm.bridge(prompt_t, return_type="logits").float()[0, -1].log_softmax(-1)
    steered = splice.logits(prompt_t)[0, -1].log_softmax(-1)
    acts = Splice(lm, dictionary).activations(prompt_t, dictionary.hooks)
    f = dictionary.encode_acts({h: a.float() for h, a in acts.items()}).dense()[0][1:, feature]
    base_ids = generate(lm, ids, tokens, None, temperature=temperature, seed=seed)
    steer_ids = generate(lm, ids, tokens, splice, temperature=temperature, seed=seed)
    res = {
        "sae": sae_name,
        "model": lm.spec,
        "feature": feature,
        "mode": mode,
        "value": float(value),
        "positions": "all" if at is None else [p - 1 for p in at],
        "error_term": "kept" if keep_error else "dropped",
        "temperature": temperature,
        "seed": seed,
        "prompt": prompt,
        "prompt_tokens": token_strings(lm.tokenizer, ids[1:]),
        "feature_activation": [round(float(v), 6) for v in f],
        "baseline": {"ids": base_ids, "text": lm.tokenizer.decode(base_ids)},
        "steered": {"ids": steer_ids, "text": lm.tokenizer.decode(steer_ids)},
    }
    promoted = promoted_tokens(lm, dictionary, feature, top)
    if promoted is None:
        res["promoted"], res["mean_logprob_change"] = None, None
        res["note"] = "the feature's decoder does not write d_model-wide vectors: no direct logit effect"
        return res
    pids, effects = promoted
    strs = token_strings(lm.tokenizer, pids)
    rows = [
        {
            "id": i,
            "token": s,
            "logit_effect": round(e, 6),
            "logprob_baseline": float(plain[i]),
            "logprob_steered": float(steered[i]),
            "change": float(steered[i] - plain[i]),
        }
        for i, s, e in zip(pids, strs, effects)
    ]
    res["promoted"] = rows
    res["mean_logprob_change"] = sum(r["change"] for r in rows) / len(rows)
    return res


def _side_by_side(left: str, right: str, width: int = 38) -> list[str]:
    a = textwrap.wrap(left.replace("\n", "⏎"), width) or [""]
    b = textwrap.wrap(right.replace("\n", "⏎"), width) or [""]
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return [f"  {x:<{width}} │ {y}" for x, y in zip(a, b)]


def format_text(res: dict) -> str:
    where = "all positions" if res["positions"] == "all" else f"prompt positions {res['positions']}"
    lines = [
        f"sae {res['sae']} feature {res['feature']}: {res['mode']} {res['value']:g} at {where} "
        f"(error term {res['error_term']}) on {res['model']}, "
        + (
            "greedy"
            if res["temperature"] == 0
            else f"sampled at temperature {res['temperature']:g}, seed {res['seed']}"
        ),
        f"prompt: {res['prompt']!r}",
        f"  {'baseline':<38} │ steered",
    ]
    lines += _side_by_side(res["baseline"]["text"], res["steered"]["text"])
    if res["promoted"] is None:
        lines.append(res["note"])
        return "\n".join(lines)
    lines.append(f"next-token log-probs of feature {res['feature']}'s top promoted tokens (direct logit effect):")
    lines.append(f"  {'token':<16} {'effect':>8} {'baseline':>9} {'steered':>9} {'change':>8}")
    for r in res["promoted"]:
        lines.append(
            f"  {r['token']!r:<16} {r['logit_effect']:8.3f} {r['logprob_baseline']:9.3f} "
            f"{r['logprob_steered']:9.3f} {r['change']:+8.3f}"
        )
    lines.append(f"  mean change {res['mean_logprob_change']:+.3f}")
    return "\n".join(lines)


@click.command("steer")
@click.option("--lake", "lake_uri", envvar="SAELAKE_LAKE", required=True, help="Lake root (env SAELAKE_LAKE).")
@click.argument("sae")
@click.option("--prompt", required=True, help="Text to continue (BOS is prepended).")
@click.option("--feature", type=int, required=True, help="Feature index.")
@click.option(
    "--value",
    type=float,
    required=True,
    help="add: amount of the decoder direction; clamp: the latent's value (ablate ignores it).",
)
@click.option("--mode", type=click.Choice(MODES), default="add", show_default=True)
@click.option("--tokens", type=int, default=20, show_default=True, help=f"New tokens (at most {MAX_TOKENS}).")
@click.option(
    "--positions",
    default="all",
    show_default=True,
    help="Where to edit: 'all' (every token, new ones too) or prompt token indices like 0,-1.",
)
@click.option(
    "--drop-error",
    is_flag=True,
    help="Replace the activations by the reconstruction (default: keep the "
    "dictionary's error term, so only the edit changes the model).",
)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; else sampled.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--top", type=int, default=10, show_default=True, help="Promoted tokens to report.")
@click.option("--model", default=None, help="Model (default: the SAE's).")
@click.option("--json", "as_json", is_flag=True)
def steer_cmd(
    lake_uri, sae, prompt, feature, value, mode, tokens, positions, drop_error, temperature, seed, top, model, as_json
):
    """Continue a prompt with a feature added, clamped or ablated; compare with the plain model."""
    if not 1 <= top <= 100:
        raise UserError(f"--top must be in 1..100, got {top}")
    res = steer(
        lake_uri,
        sae,
        prompt,
        feature,
        value,
        mode=mode,
        tokens=tokens,
        positions=parse_positions(positions),
        keep_error=not drop_error,
        model=model,
        temperature=temperature,
        seed=seed,
        top=top,
    )
    click.echo(json.dumps(res, indent=2) if as_json else format_text(res))
