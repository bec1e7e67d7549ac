"""Imports checked against the peers' own code: the folders in tests/data/peers/ were written by
SAELens, sparsify and Llamascopium themselves, with their own forward outputs on the tiny model's
activations (tests/data/peers/make_fixtures.py). saelake's imported dictionary, fed the same raw
activations, must give the same latents and outputs (float32 tolerance)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelake.lake import UserError
from saelake.train import load_sae
from saelake.train.interop import import_dictionary

PEERS = Path(__file__).resolve().parents[1] / "data" / "peers"
ACTS = load_file(str(PEERS / "activations.safetensors"))


def rows(hook: str) -> torch.Tensor:
    return ACTS[hook].reshape(-1, ACTS[hook].shape[-1])


def forward(lake: str, name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    sae, cfg = load_sae(lake, name)
    with torch.no_grad():
        codes = sae.encode(rows(cfg["hooks"][0]))
        return codes.dense()[0], sae.decode(codes)[0], cfg


def fired(latents: torch.Tensor) -> int:
    """Latents that fire (ignoring ReLU outputs within float32 rounding of zero)."""
    return int((latents.abs() > 1e-6 * float(latents.abs().max())).sum())


def assert_matches(lake: str, name: str, folder: Path, latent_scale: float = 1.0) -> dict:
    ref = load_file(str(folder / "peer_reference.safetensors"))
    latents, output, cfg = forward(lake, name)
    scale = float(ref["output"].abs().max())
    torch.testing.assert_close(output, ref["output"], atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(
        latents, ref["latents"] * latent_scale, atol=1e-5 * float(latents.abs().max()), rtol=1e-4
    )
    assert fired(latents) == fired(ref["latents"] * latent_scale) > 0  # the same latents fire
    return cfg


@pytest.mark.parametrize(
    "case,arch",
    [
        ("standard", "relu"),
        ("jumprelu", "jumprelu"),
        ("topk", "topk"),
        ("topk_rescaled", "topk"),
        ("transcoder", "relu"),
        ("jumprelu_transcoder", "jumprelu"),
        ("batchtopk", "jumprelu"),
        ("expected_average_only_in", "relu"),
        ("covariance_whitening", "topk"),
    ],
)
def test_saelens_folders_match_saelens_forward(tmp_path, case, arch):
    lake = str(tmp_path / "lake")
    import_dictionary(lake, PEERS / "saelens" / case, "imp")
    cfg = assert_matches(lake, "imp", PEERS / "saelens" / case)
    assert cfg["arch"] == arch and cfg["import_format"] == "saelens" and cfg["model"] == "tiny-gpt2"
    if "transcoder" in case:
        assert cfg["hooks"] == ["blocks.1.mlp.hook_in"] and cfg["out_hooks"] == ["blocks.1.hook_mlp_out"]
    if case in ("expected_average_only_in", "covariance_whitening"):
        assert cfg["normalization"]["method"] == f"saelens:{case}"


@pytest.mark.parametrize("case", ["constant_norm_rescale", "layer_norm"])
def test_saelens_per_token_norms_are_refused(tmp_path, case):
    with pytest.raises(UserError, match="per-token scale: this SAE cannot be imported"):
        import_dictionary(str(tmp_path / "lake"), PEERS / "saelens" / case, "imp")


def test_saelens_loads_what_saelake_exports(tmp_path):
    """SAELens' own forward on folders saelake exported equals saelake's on the import of the same
    folder; export -> import -> export gives the same weight bytes."""
    from saelake.train.interop import export_saelens

    lake = str(tmp_path / "lake")
    for folder in sorted((PEERS / "saelake_exports").iterdir()):
        import_dictionary(lake, folder, folder.name)
        assert_matches(lake, folder.name, folder)
        again = export_saelens(lake, folder.name, tmp_path / folder.name)
        assert (again / "sae_weights.safetensors").read_bytes() == (folder / "sae_weights.safetensors").read_bytes()


@pytest.mark.parametrize(
    "hookpoint,hooks",
    [("h.0", ["blocks.0.hook_resid_post"] * 2), ("h.1.mlp", ["blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"])],
)
def test_sparsify_checkpoints_match_sparsify_forward(tmp_path, hookpoint, hooks):
    """sparsify computed its forward on the activations its trainer hooks (HF modules): saelake reads
    the mapped TransformerLens hooks, so equal outputs also check the hookpoint mapping."""
    hf = load_file(str(PEERS / "sparsify_hook_activations.safetensors"))
    torch.testing.assert_close(rows(hooks[1]), hf[f"{hookpoint}.out"], atol=1e-5, rtol=1e-5)
    if hooks[0] != hooks[1]:
        torch.testing.assert_close(rows(hooks[0]), hf[f"{hookpoint}.in"], atol=1e-5, rtol=1e-5)
    lake = str(tmp_path / "lake")
    cfg = import_dictionary(lake, PEERS / "sparsify" / hookpoint, "imp")
    assert cfg["arch"] == "topk" and cfg["k"] == 8 and [cfg["hook"], cfg["out_hook"]] == hooks
    assert_matches(lake, "imp", PEERS / "sparsify" / hookpoint)


def test_sparsify_run_folder_asks_for_one_hookpoint(tmp_path):
    with pytest.raises(UserError, match=r"several hookpoints \(h.0, h.1.mlp\): import one folder"):
        import_dictionary(str(tmp_path / "lake"), PEERS / "sparsify", "imp")


@pytest.mark.parametrize(
    "case,arch",
    [
        ("sae_topk", "topk"),
        ("sae_relu", "relu"),
        ("sae_jumprelu", "jumprelu"),
        ("transcoder_jumprelu", "jumprelu"),
        ("sae_topk_inference", "topk"),
    ],
)
def test_llamascopium_dictionaries_match_its_forward(tmp_path, case, arch):
    """Its forward on raw activations (normalise, encode, decode, denormalise): the same output; the
    latents divided by s_in, as Llamascopium's own folding means them (``latents_folded``, where that
    folding is exact: its fold leaves JumpReLU thresholds unscaled, so it silences every latent there)."""
    lake = str(tmp_path / "lake")
    folder = PEERS / "llamascopium" / case
    cfg = import_dictionary(lake, folder, "imp")
    assert cfg["arch"] == arch and cfg["import_format"] == "llamascopium"
    ref = load_file(str(folder / "peer_reference.safetensors"))
    latents, output, _ = forward(lake, "imp")
    if case == "sae_topk_inference":  # saved already folded: its forward is the folded one
        ref |= {"latents": ref["latents_folded"], "output": ref["output_folded"]}
        s_in = 1.0
    else:
        s_in = cfg["normalization"]["s_in"]
        assert cfg["normalization"]["method"] == "llamascopium:dataset-wise"
    torch.testing.assert_close(output, ref["output"], atol=1e-5 * float(ref["output"].abs().max()), rtol=1e-4)
    torch.testing.assert_close(latents, ref["latents"] / s_in, atol=1e-5 * float(latents.abs().max()), rtol=1e-4)
    assert fired(latents) == fired(ref["latents"] / s_in) > 0
    if arch != "jumprelu":
        torch.testing.assert_close(latents, ref["latents_folded"], atol=1e-5 * float(latents.abs().max()), rtol=1e-4)
    if "transcoder" in case:
        assert cfg["hooks"] == ["blocks.1.mlp.hook_in"] and cfg["out_hooks"] == ["blocks.1.hook_mlp_out"]


def test_llamascopium_token_wise_norm_is_refused(tmp_path):
    with pytest.raises(UserError, match="norm_activation 'token-wise' scales each token"):
        import_dictionary(str(tmp_path / "lake"), PEERS / "llamascopium" / "sae_token_wise", "imp")


def _edited(tmp_path: Path, src: str, name: str, **keys) -> Path:
    import json
    import shutil

    folder = tmp_path / "src" / name
    shutil.copytree(PEERS / src, folder)
    cfg_file = next(f for f in ("cfg.json", "config.json") if (folder / f).exists())
    cfg = json.loads((folder / cfg_file).read_text())
    (folder / cfg_file).write_text(json.dumps({**cfg, **keys}))
    return folder


@pytest.mark.parametrize(
    "src,keys,msg",
    [
        ("saelens/expected_average_only_in", {}, "pass --norm-scaling-factor F"),
        ("saelens/standard", {"architecture": "gated"}, "SAELens architecture 'gated' is not supported"),
        ("saelens/standard", {"normalize_activations": "batch_norm"}, "unknown normalize_activations 'batch_norm'"),
        ("saelens/transcoder", {"metadata": {"hook_name": "blocks.1.mlp.hook_in"}}, "pass --out-hook"),
        ("sparsify/h.0", {"activation": "groupmax"}, "no saelake kind computes groupmax"),
        ("sparsify/h.0", {"skip_connection": True}, "skip connection"),
        ("llamascopium/sae_topk", {"sae_type": "lorsa"}, "sae_type 'lorsa' is not supported"),
        ("llamascopium/clt_jumprelu", {"act_fn": "batchlayertopk"}, "saelake imports Llamascopium's JumpReLU CLTs"),
        ("llamascopium/sae_topk", {"act_fn": "batchtopk"}, "topk_to_jumprelu_conversion"),
        ("llamascopium/sae_topk", {"use_glu_encoder": True}, "GLU encoder"),
    ],
)
def test_imports_refuse_what_they_cannot_express(tmp_path, src, keys, msg):
    folder = _edited(tmp_path, src, src.split("/")[-1], **keys)
    if src == "saelens/expected_average_only_in":
        (folder / "activation_scaler.json").unlink()
    with pytest.raises(UserError, match=msg.replace("(", r"\(")):
        import_dictionary(str(tmp_path / "lake"), folder, "imp")


def test_saelens_norm_scaling_factor_given_by_hand(tmp_path):
    import json

    folder = _edited(tmp_path, "saelens/expected_average_only_in", "eao")
    factor = json.loads((folder / "activation_scaler.json").read_text())["scaling_factor"]
    (folder / "activation_scaler.json").unlink()
    lake = str(tmp_path / "lake")
    import_dictionary(lake, folder, "imp", norm_scaling_factor=factor)
    assert_matches(lake, "imp", folder)
    with pytest.raises(UserError, match="SAE name 'imp' is taken"):
        import_dictionary(lake, folder, "imp", norm_scaling_factor=factor)


def test_llamascopium_cross_layer_transcoder_matches_its_forward(tmp_path):
    """Its JumpReLU CLT (two layers' MLPs, dataset-wise norms per hook, decoder norms in the sparsity)
    as saelake's clt-jumprelu: every layer's output equal, the latents divided by each layer's s_in."""
    lake = str(tmp_path / "lake")
    folder = PEERS / "llamascopium" / "clt_jumprelu"
    cfg = import_dictionary(lake, folder, "imp")
    assert cfg["arch"] == "clt-jumprelu" and cfg["hooks"] == ["blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in"]
    ref = load_file(str(folder / "peer_reference.safetensors"))
    sae, _ = load_sae(lake, "imp")
    with torch.no_grad():
        codes = sae.encode_acts({h: rows(h) for h in cfg["hooks"]})
        output = sae.decode(codes)[0].reshape(-1, 2, 32)
    latents = codes.dense()[0].reshape(-1, 2, 32)
    s_in = torch.tensor(cfg["normalization"]["s_in"]).view(1, 2, 1)
    torch.testing.assert_close(output, ref["output"], atol=1e-5 * float(ref["output"].abs().max()), rtol=1e-4)
    torch.testing.assert_close(latents, ref["latents"] / s_in, atol=1e-5 * float(latents.abs().max()), rtol=1e-4)
    assert fired(latents) == fired(ref["latents"]) > 0
