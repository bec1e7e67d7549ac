"""Chat models that write and judge explanations: a local model, or an OpenAI-compatible server.

``chat_model("local", model)`` runs a causal LM on this machine with transformers (the bundled
SmolLM2-135M-Instruct by default: small and weak, but real and offline), greedy, with the
tokenizer's chat template (a plain "User:/Assistant:" layout for models without one).
``chat_model(URL, model)`` talks to any OpenAI-compatible chat-completions server (vLLM,
llama.cpp's server, a hosted API): ``URL`` is its base (``http://host:port/v1``) or the full
``.../chat/completions`` address. A key, when the server needs one, is read from the environment
variable the user names (``--api-key-env``) and sent as a bearer token; it is never stored, and
the URL recorded with each explanation has no credentials, query or fragment.

Both answer ``complete(messages, max_tokens)`` with text and ``yes_no(messages)`` with a bool
(the scorer's question): the local model compares the next-token logits of "Yes" and "No"
spellings; a server is asked for the first token's top log-probabilities and the likelier of
"yes" and "no" wins; without them (or when neither is among them) the first "yes" or "no" in its
short answer counts.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from saelake.lake import UserError

DEFAULT_LOCAL = "smollm2-135m"
YES, NO = ("Yes", "yes", " Yes", " yes", "YES"), ("No", "no", " No", " no", "NO")


class ChatModel(Protocol):
    explainer: str  # what is recorded: "local" or the server's URL without credentials
    model: str  # the model's name

    def complete(self, messages: list[dict], max_tokens: int = 48) -> str: ...
    def yes_no(self, messages: list[dict]) -> bool | None: ...


def chat_model(
    explainer: str, model: str | None = None, api_key_env: str | None = None, timeout_s: float = 120.0
) -> ChatModel:
    if explainer == "local":
        return LocalChat(model or DEFAULT_LOCAL)
    if explainer.startswith(("http://", "https://")):
        return OpenAIChat(explainer, model, api_key_env, timeout_s)
    raise UserError(
        f"--explainer must be 'local' or the URL of an OpenAI-compatible server "
        f"(http://host:port/v1), not {explainer[:80]!r}"
    )


def first_word_yes(text: str) -> bool | None:
    """True / False for the first "yes" / "no" in a short answer ("Yes.", "The answer is no"), else None."""
    m = re.search(r"\b(yes|no)\b", text or "", re.I)
    return None if not m else m.group(1).lower() == "yes"


def top_logprobs_yes(tops: list[dict]) -> bool | None:
    """Yes or no by the likelier of the two among the first token's top log-probabilities (None: neither)."""
    best: dict[str, float] = {}
    for t in tops:
        w = str(t.get("token", "")).strip().lower()
        if w in ("yes", "no") and isinstance(t.get("logprob"), (int, float)):
            best[w] = max(best.get(w, float("-inf")), float(t["logprob"]))
    if not best:
        return None
    return best.get("yes", float("-inf")) > best.get("no", float("-inf"))


class LocalChat:
    """A causal LM run on this machine (CPU), loaded once."""

    explainer = "local"

    def __init__(self, spec: str):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from saelake.lake.models import resolve_model

        target, kind = resolve_model(spec)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(target)
            self.lm = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        except Exception as e:
            raise UserError(f"cannot load explainer model {spec!r} ({type(e).__name__}: {str(e)[:200]})") from None
        self.model = spec
        self.max_len = int(getattr(self.lm.config, "max_position_embeddings", 2048) or 2048)
        self._yes = self._first_ids(YES)
        self._no = self._first_ids(NO)

    def _first_ids(self, words) -> list[int]:
        ids = {
            self.tokenizer(w, add_special_tokens=False)["input_ids"][0]
            for w in words
            if self.tokenizer(w, add_special_tokens=False)["input_ids"]
        }
        return sorted(ids)

    def _ids(self, messages: list[dict], room: int):
        import torch

        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + room > self.max_len:
            raise UserError(
                f"the prompt is {len(ids)} tokens; model {self.model} takes {self.max_len}: "
                "show fewer or shorter examples"
            )
        return torch.tensor([ids])

    def complete(self, messages: list[dict], max_tokens: int = 48) -> str:
        import torch

        ids = self._ids(messages, max_tokens)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.lm.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad
            )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def yes_no(self, messages: list[dict]) -> bool | None:
        import torch

        ids = self._ids(messages, 1)
        with torch.no_grad():
            logits = self.lm(ids).logits[0, -1]
        if not self._yes or not self._no:
            return first_word_yes(self.complete(messages, 3))
        return bool(logits[self._yes].max() > logits[self._no].max())


class OpenAIChat:
    """An OpenAI-compatible chat-completions server over HTTP (urllib, with a timeout on every call)."""

    def __init__(self, url: str, model: str | None, api_key_env: str | None, timeout_s: float):
        parts = urlsplit(url)
        if not parts.hostname:
            raise UserError(f"--explainer {url[:80]!r} is not a URL with a host")
        if parts.username or parts.password:
            raise UserError("put the API key in an environment variable (--api-key-env NAME), not in the URL")
        path = parts.path.rstrip("/")
        self.endpoint = urlunsplit(
            (
                parts.scheme,
                parts.netloc,
                path if path.endswith("/chat/completions") else path + "/chat/completions",
                "",
                "",
            )
        )
        self.explainer = urlunsplit((parts.scheme, parts.netloc, path, "", ""))  # no query: keys hide there too
        self.model = model or "default"
        self.timeout_s = timeout_s
        self.logprobs = True  # until the server refuses them
        self.key = None
        if api_key_env:
            self.key = os.environ.get(api_key_env)
            if not self.key:
                raise UserError(f"--api-key-env {api_key_env}: that environment variable is not set")

    def _post(self, body: dict) -> dict:
        req = urllib.request.Request(
            self.endpoint,
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {self.key}"} if self.key else {}),
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace").replace("\n", " ")
            raise ServerError(f"explainer server {self.explainer} answered HTTP {e.code}: {detail}", e.code) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"cannot reach the explainer server {self.explainer} ({reason}): is it running?") from None
        except ValueError:
            raise UserError(f"explainer server {self.explainer} did not answer JSON") from None

    def complete(self, messages: list[dict], max_tokens: int = 48) -> str:
        out = self._post({"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        try:
            return out["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"explainer server {self.explainer} answered without choices[0].message.content") from None

    def yes_no(self, messages: list[dict]) -> bool | None:
        """The likelier of "yes" and "no" as the first token when the server returns log-probabilities
        (asked for once; a server that refuses them is not asked again), else the answer's first yes/no."""
        body = {"model": self.model, "messages": messages, "max_tokens": 8, "temperature": 0}
        if self.logprobs:
            try:  # one token is enough when its log-probabilities come back
                out = self._post({**body, "max_tokens": 1, "logprobs": True, "top_logprobs": 20})
            except ServerError as e:
                if e.status not in (400, 422):
                    raise
                self.logprobs = False
                out = self._post(body)
        else:
            out = self._post(body)
        try:
            choice = out["choices"][0]
            tops = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []
            text = (choice.get("message") or {}).get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise UserError(f"explainer server {self.explainer} answered without choices[0]") from None
        verdict = top_logprobs_yes(tops)
        return verdict if verdict is not None else first_word_yes(text)


class ServerError(UserError):
    """An HTTP error status from the server (``status``)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
