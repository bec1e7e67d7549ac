"""Live inference for the web UI: text -> model activations at the SAE's hook(s) -> latents.

The model is ``--model`` when given, else the one the SAE's config (or its run) names; it is
loaded on the first request and kept. One lock serialises forward passes (CPU, 2 cores).
BOS is prepended as at ingest and left out of the answer (the analysis excludes it too).
"""

from __future__ import annotations

import threading

import torch

from saelake.analyze.directions import token_strings
from saelake.lake import UserError

from .data import LakeData, NotFound

MAX_CHARS = 4000


class LiveError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class LiveEncoder:
    def __init__(self, data: LakeData):
        self.data = data
        self._lock = threading.Lock()
        self._models: dict = {}
        self._saes: dict = {}

    def model_spec(self, cfg: dict) -> str | None:
        spec = self.data.model_spec or cfg.get("model")
        if not spec and cfg.get("run"):
            try:
                spec = self.data.run(cfg["run"]).get("model")
            except NotFound:
                spec = None
        return spec

    def is_loaded(self, spec: str | None) -> bool:
        """Whether a live call with this model answers now (else it loads the model first)."""
        return spec in self._models

    def _model(self, spec: str):
        from saelake.lake import load_model

        if spec not in self._models:
            try:
                self._models[spec] = load_model(spec)
            except UserError as e:
                raise LiveError(f"model {spec!r} is not available: {e}", 503) from None
        return self._models[spec]

    def _sae(self, name: str, cfg: dict):
        from saelake.train.store import SAEStore

        key = (name, cfg.get("updated") or cfg.get("created"))
        if key not in self._saes:
            try:
                self._saes[key] = SAEStore(self.data.lake).load(name)[0]
            except UserError as e:
                raise LiveError(str(e), 404) from None
        return self._saes[key]

    def steer(self, sae_name: str, req: dict) -> dict:
        """The steering box: ``lake steer`` on the loaded model (``saelake.analyze.steer``)."""
        from saelake.analyze.steer import MAX_TOKENS, steer

        cfg = self.data.sae(sae_name)  # NotFound -> 404
        prompt, feature, value = req.get("prompt"), req.get("feature"), req.get("value")
        mode, tokens = req.get("mode", "add"), req.get("tokens", 20)
        if not isinstance(prompt, str) or not prompt.strip():
            raise LiveError("type a prompt first")
        if len(prompt) > MAX_CHARS:
            raise LiveError(f"prompt too long ({len(prompt)} characters; at most {MAX_CHARS})")
        for key, v in (("feature", feature), ("tokens", tokens)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise LiveError(f"{key} must be an integer")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LiveError("value must be a number")
        spec = self.model_spec(cfg)
        if not spec:
            raise LiveError(f"no model for SAE {sae_name!r}: start lake serve with --model M", 503)
        with self._lock:
            model = self._model(spec)
            sae = self._sae(sae_name, cfg)
            try:
                return steer(
                    self.data.lake,
                    sae_name,
                    prompt,
                    feature,
                    float(value),
                    mode=str(mode),
                    tokens=min(tokens, MAX_TOKENS),
                    model=model,
                    sae=(sae, cfg),
                )
            except UserError as e:
                raise LiveError(str(e)) from None

    @torch.no_grad()
    def run(self, sae_name: str, text: str, feature: int | None = None, top: int = 5) -> dict:
        cfg = self.data.sae(sae_name)  # NotFound -> 404
        if not isinstance(text, str) or not text.strip():
            raise LiveError("type some text first")
        if len(text) > MAX_CHARS:
            raise LiveError(f"text too long ({len(text)} characters; at most {MAX_CHARS})")
        if feature is not None and not 0 <= feature < int(cfg.get("d_sae") or 0):
            raise LiveError(f"no feature {feature} in SAE {sae_name!r} (features 0..{int(cfg['d_sae']) - 1})", 404)
        top = max(1, min(int(top), 20))
        spec = self.model_spec(cfg)
        if not spec:
            raise LiveError(f"no model for SAE {sae_name!r}: start lake serve with --model M", 503)
        with self._lock:
            model = self._model(spec)
            sae = self._sae(sae_name, cfg)
            hooks = sae.hooks  # what the dictionary reads
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = [model.bos_token_id] + list(ids)[: max(1, int(model.n_ctx or 1024) - 1)]
            tokens = torch.tensor([ids], dtype=torch.long)
            try:
                acts = model.activations(tokens, hooks)
            except UserError as e:
                raise LiveError(str(e), 503) from None
            x = sae.read({h: acts[h][0].float() for h in hooks})
            if x.shape[-1] != sae.d_in:
                raise LiveError(
                    f"SAE {sae_name!r} takes inputs of size {sae.d_in}, model {spec} gives "
                    f"{x.shape[-1]} at {','.join(hooks)}",
                    503,
                )
            f = sae.encode(x).dense()[0][1:]  # [T-1, d_sae], BOS left out
            strs = token_strings(model.tokenizer, ids[1:])
        out = {"sae": sae_name, "model": spec, "tokens": strs, "token_ids": ids[1:]}
        if feature is not None:
            out["feature"] = feature
            out["acts"] = [round(float(v), 6) for v in f[:, feature]]
        else:
            vals, idx = f.topk(min(top, f.shape[1]), dim=1)
            out["top"] = [
                [[int(i), round(float(v), 6)] for i, v in zip(ii, vv) if v > 0]
                for ii, vv in zip(idx.tolist(), vals.tolist())
            ]
        return out
