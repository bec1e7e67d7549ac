"""Lorsa: causal (no future leakage), the model's rotary embedding, save/load and folding exact, trains
on whole contexts from the 2d table or live (FVU falls), resumes bitwise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from saelake.lake import SnapshotSource, load_model
from saelake.train import SAEStore, dictionaries
from saelake.train.dictionaries.lorsa import rotary
from tests.train.conftest import lake_main

IN, OUT = "blocks.0.ln1.hook_normalized", "blocks.0.hook_attn_out"


def make_tiny_llama(path: Path, tokenizer_from: str) -> Path:
    """A random Llama-architecture model (RoPE base 500, 4 heads of 8 over 2 KV heads) with the tiny
    test model's tokenizer; RMSNorm weights random so that a norm's input and output differ."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tiny_model, tmp_path_factory):
    return str(make_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama", tiny_model))


@pytest.fixture(scope="module")
def lorsa_lake(tiny_model, tiny_corpus, tmp_path_factory):
    """Layer 0's attention input and output, 2d (and 1d, which Lorsa does not need)."""
    from saelake.lake import IngestConfig, ingest

    root = str(tmp_path_factory.mktemp("lorsalake") / "lake")
    ingest(
        IngestConfig(
            lake=root,
            model=tiny_model,
            dataset=tiny_corpus,
            hooks=[IN, OUT],
            tokens=3000,
            context_size=32,
            layouts=["1d", "2d"],
            run="r",
        ),
        progress=False,
    )
    return root


@pytest.fixture
def lake(lorsa_lake, tmp_path):
    dst = tmp_path / "lake"
    shutil.copytree(lorsa_lake, dst, ignore=shutil.ignore_patterns("saes", "catalog.duckdb*"))
    return str(dst)


def _lorsa(n=1, d=16, heads=24, **opts):
    torch.manual_seed(0)
    m = dictionaries.get("lorsa").build(
        d,
        heads,
        d,
        n,
        hooks=["in"],
        out_hooks=["out"],
        **({"qk_heads": 4, "d_qk": 6, "k": 5, "rotary_base": 100.0} | opts),
    )
    m.initialize([torch.Generator().manual_seed(i) for i in range(n)])
    with torch.no_grad():
        for p in (m.b_Q, m.b_K, m.b_V, m.b_O):
            p.normal_(0, 0.3)
    return m


def test_no_future_leakage():
    """The output (and the active heads) at position t do not change when the tokens after t change."""
    m = _lorsa(n=2)
    x = torch.randn(3, 12, 16)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(3, 5, 16)
    y, y2 = m(x).view(2, 3, 12, 16), m(x2).view(2, 3, 12, 16)
    torch.testing.assert_close(y[:, :, :7], y2[:, :, :7])
    assert not torch.allclose(y[:, :, 7:], y2[:, :, 7:])
    f, f2 = m.encode(x).dense().view(2, 3, 12, -1), m.encode(x2).dense().view(2, 3, 12, -1)
    torch.testing.assert_close(f[:, :, :7], f2[:, :, :7])
    assert ((f != 0).sum(-1) <= 5).all()  # top k heads per position


def test_the_definition_and_one_context_as_a_batch_of_one():
    """z_h = A_g(h) (x w_V,h + b_V,h) with A the causal softmax of rope(q) rope(k)ᵀ/sqrt(d_qk); top k per
    position; one context [T, d] encodes as a batch of one."""
    m = _lorsa()
    x = torch.randn(2, 9, 16)
    g_of = torch.arange(24) // 6
    with torch.no_grad():
        q = rotary(torch.einsum("btd,gde->bgte", x, m.W_Q[0]) + m.b_Q[0][None, :, None], 100.0, 6)
        k = rotary(torch.einsum("btd,gde->bgte", x, m.W_K[0]) + m.b_K[0][None, :, None], 100.0, 6)
        scores = (q @ k.transpose(-1, -2)) / 6**0.5 + torch.full((9, 9), float("-inf")).triu(1)
        A = scores.softmax(-1)  # [b, G, T, T]
        v = x @ m.W_V[0].t() + m.b_V[0]  # [b, T, H]
        z = torch.einsum("bhts,bsh->bth", A[:, g_of], v)
        top = z.topk(5, -1)
        f = torch.zeros_like(z).scatter_(-1, top.indices, top.values.relu())
        y = f @ m.W_O[0] + m.b_O[0]
    torch.testing.assert_close(m(x)[0].view(2, 9, 16), y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m(x[1])[0], y[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.attention(x[0], 13), A[0, 2], atol=1e-6, rtol=1e-5)


def test_rotary_is_the_models(tiny_llama):
    """Lorsa's RoPE equals the Llama attention's, and a Lorsa whose QK groups are the model's heads
    reproduces the model's attention patterns on real activations (RoPE base and head size read
    from the model's config)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8)
    cos, sin = LlamaRotaryEmbedding(AutoConfig.from_pretrained(tiny_llama))(q, torch.arange(10)[None])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(rotary(q, 500.0, 8), q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotary(k, 500.0, 8), k_hf, atol=1e-5, rtol=1e-5)
    # QK groups = the model's 4 heads (2 KV heads), options resolved from the model
    kind = dictionaries.get("lorsa")
    opts = kind.Options(heads=8, qk_heads=4, k=2)
    opts.resolve(32, 8, "t")
    kind.resolve_shape(
        opts,
        ["blocks.0.ln1.hook_out"],
        ["blocks.0.hook_attn_out"],
        {"blocks.0.ln1.hook_out": 32, "blocks.0.hook_attn_out": 32},
        8,
        "t",
        tiny_llama,
    )
    assert (opts.d_qk, opts.rotary_base, opts.rotary_dim) == (8, 500.0, 8)
    m = kind(32, 8, 32, [opts], hooks=["blocks.0.ln1.hook_out"], out_hooks=["blocks.0.hook_attn_out"])
    attn = AutoModelForCausalLM.from_pretrained(tiny_llama).model.layers[0].self_attn
    with torch.no_grad():
        Wq, Wk = attn.q_proj.weight.view(4, 8, 32), attn.k_proj.weight.view(2, 8, 32)
        m.W_Q[0] = Wq.transpose(1, 2)
        m.W_K[0] = Wk.repeat_interleave(2, 0).transpose(1, 2)
    lm = load_model(tiny_llama)
    tokens = torch.tensor([[lm.bos_token_id, 5, 17, 33, 8, 90, 41, 7, 12, 3]])
    acts = lm.activations(tokens, ["blocks.0.ln1.hook_out", "blocks.0.attn.hook_pattern"])
    for head in range(4):
        torch.testing.assert_close(
            m.attention(acts["blocks.0.ln1.hook_out"][0], 2 * head),
            acts["blocks.0.attn.hook_pattern"][0, head],
            atol=1e-5,
            rtol=1e-4,
        )


def test_fold_and_save_load_are_exact(lake):
    """Weights trained on scaled activations, folded, take raw ones; saved and loaded, outputs are identical."""
    m = _lorsa()
    s_in, s_out = torch.rand(16) + 0.5, torch.rand(16) + 0.5
    kind = dictionaries.get("lorsa")
    folded = kind.fold(m.member_state(0), s_in, s_out)
    m2 = kind.build(
        16,
        24,
        16,
        hooks=["in"],
        out_hooks=["out"],
        **{k: getattr(m.options[0], k) for k in ("qk_heads", "d_qk", "k", "rotary_base", "rotary_dim")},
    )
    m2.load_member(0, folded)
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(m2(x)[0], (m(x * s_in)[0]) / s_out, atol=1e-5, rtol=1e-4)
    store = SAEStore(lake)
    cfg = {
        "name": "saved",
        "arch": "lorsa",
        "hooks": [IN],
        "out_hooks": [OUT],
        "d_in": 16,
        "d_sae": 24,
        "status": "complete",
        "hyperparameters": {
            k: getattr(m.options[0], k) for k in ("heads", "qk_heads", "d_qk", "k", "rotary_base", "rotary_dim")
        },
    }
    store.save(cfg, m.member_state(0), register=False)
    loaded, _ = store.load("saved")
    assert torch.equal(loaded(x), m.inference()(x))


def test_train_on_contexts_fvu_falls_and_resume_is_bitwise(lake):
    args = [
        "--lake",
        lake,
        "--run",
        "r",
        "--arch",
        "lorsa",
        "--hook",
        IN,
        "--out-hook",
        OUT,
        "--heads",
        "64",
        "--qk-heads",
        "4",
        "--d-qk",
        "8",
        "--k",
        "4",
        "--tokens",
        "16384",
        "--batch-size",
        "256",
        "--repeat",
        "--lr",
        "0.01",
        "--holdout",
        "320",
        "--checkpoint-every",
        "16",
        "--quiet",
    ]
    code, out, err = lake_main("train", *args, "--name", "l")
    assert code == 0, err
    store = SAEStore(lake)
    cfg = store.config("l")
    assert cfg["training"]["contexts_per_step"] == 8 and cfg["holdout"]["contexts"] == 10
    assert cfg["hyperparameters"]["rotary_base"] == 0  # GPT-2: no rotary embedding
    curve = [r["value"] for r in store.metrics("l") if r["name"] == "fvu"]
    assert curve[-1] < 0.8 * curve[0] and cfg["heldout_fvu"] < 0.9, (curve[0], curve[-1], cfg["heldout_fvu"])
    # the saved Lorsa (raw units) reproduces its held-out FVU on the held-out contexts (BOS left out)
    sae, _ = store.load("l")
    src = SnapshotSource(lake, "r")
    b = next(src.context_batches(10, [IN, OUT], start=cfg["holdout"]["rows"][0]))
    _, written = sae.reconstruct({IN: b.acts[IN].float()})
    keep = b.tokens != src.manifest.model_info.bos_token_id
    y, y_hat = b.acts[OUT].float()[keep], written[OUT][keep]
    assert float((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()) == pytest.approx(cfg["heldout_fvu"], rel=1e-3)
    code, out, err = lake_main("train", *args, "--name", "l2", "--stop-after", "32")
    assert code == 0 and "interrupted" in out, err
    code, out, err = lake_main("train", *args, "--name", "l2", "--resume")
    assert code == 0, err
    w1, w2 = store.weights("l"), store.weights("l2")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_train_live_on_a_rotary_model(lake, tiny_llama, snapshot):
    """Live on the Llama-architecture model: contexts straight from the model, its RoPE picked up."""
    code, out, err = lake_main(
        "train",
        "--lake",
        lake,
        "--live",
        "--model",
        tiny_llama,
        "--dataset",
        snapshot["corpus"],
        "--context-size",
        "32",
        "--arch",
        "lorsa",
        "--hook",
        "blocks.1.ln1.hook_normalized",
        "--out-hook",
        "blocks.1.hook_attn_out",
        "--heads",
        "32",
        "--qk-heads",
        "4",
        "--k",
        "4",
        "--tokens",
        "2048",
        "--batch-size",
        "256",
        "--holdout",
        "256",
        "--name",
        "live",
        "--quiet",
    )
    assert code == 0, err
    cfg = SAEStore(lake).config("live")
    hp = cfg["hyperparameters"]
    assert (hp["rotary_base"], hp["d_qk"], hp["rotary_dim"]) == (500.0, 8, 8)
    assert cfg["holdout"]["contexts"] == 8 and cfg["heldout_fvu"] is not None


def test_lorsa_refusals_are_one_line(lake, snapshot):
    base = ["train", "--lake", lake, "--run", "r", "--tokens", "512", "--quiet", "--arch", "lorsa"]
    code, _, err = lake_main(*base, "--hook", IN, "--out-hook", OUT, "--heads", "60", "--qk-heads", "7")
    assert code == 2 and "qk_heads (7) must divide heads (60)" in err, err
    code, _, err = lake_main(*base, "--hook", f"{IN},{OUT}", "--out-hook", OUT)
    assert code == 2 and "Lorsa reads one hook and writes one" in err, err


def test_eval_splices_lorsa_over_whole_contexts_and_export_refuses(lake, tmp_path):
    code, _, err = lake_main(
        "train",
        "--lake",
        lake,
        "--run",
        "r",
        "--arch",
        "lorsa",
        "--hook",
        IN,
        "--out-hook",
        OUT,
        "--heads",
        "64",
        "--qk-heads",
        "4",
        "--d-qk",
        "8",
        "--k",
        "8",
        "--tokens",
        "8192",
        "--batch-size",
        "256",
        "--repeat",
        "--lr",
        "0.01",
        "--holdout",
        "0",
        "--name",
        "e",
        "--quiet",
    )
    assert code == 0, err
    code, out, err = lake_main("eval", "--lake", lake, "e", "--tokens", "512", "--json")
    assert code == 0, err
    res = __import__("json").loads(out)
    assert res["ce_loss_recovered"] is not None and res["kl"] >= 0 and 0 < res["fvu"] < 1, res
    code, _, err = lake_main("export", "--lake", lake, "e", "-o", str(tmp_path / "out"))
    assert code == 2 and "is a lorsa" in err and "no format" in err, err


def test_a_sweep_stacks_lorsas(lake, tmp_path):
    """Two Lorsas (lr and seed differ) step together on the same contexts, and match separate runs."""
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        f'run = "r"\ntokens = 1024\nbatch_size = 256\nholdout = 0\narch = "lorsa"\nhook = "{IN}"\n'
        f'out_hook = "{OUT}"\nheads = 32\nqk_heads = 4\nd_qk = 8\nk = 4\n[[sae]]\nname = "a"\n'
        '[[sae]]\nname = "b"\nlr = 0.01\nseed = 3\n'
    )
    code, _, err = lake_main("train", "--lake", lake, "--config", str(sweep), "--quiet")
    assert code == 0, err
    store = SAEStore(lake)
    assert store.config("a")["training"]["stacked_with"] == ["a", "b"]
    code, _, err = lake_main(
        "train",
        "--lake",
        lake,
        "--run",
        "r",
        "--arch",
        "lorsa",
        "--hook",
        IN,
        "--out-hook",
        OUT,
        "--heads",
        "32",
        "--qk-heads",
        "4",
        "--d-qk",
        "8",
        "--k",
        "4",
        "--tokens",
        "1024",
        "--batch-size",
        "256",
        "--holdout",
        "0",
        "--lr",
        "0.01",
        "--seed",
        "3",
        "--name",
        "b1",
        "--quiet",
    )
    assert code == 0, err
    wb, w1 = store.weights("b"), store.weights("b1")
    assert all(torch.allclose(wb[k], w1[k], atol=1e-5, rtol=1e-4) for k in wb)
