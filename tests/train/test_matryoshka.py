"""Matryoshka BatchTopK: the loss sums the error of each nested prefix; trained prefixes reconstruct alone."""

from __future__ import annotations

import torch

from saelake.lake import SnapshotSource
from saelake.train import SAEStore, dictionaries
from tests.train.conftest import H1, lake_main


def test_prefix_losses_are_the_dense_sums():
    """extra_loss = Σ over the proper prefixes of ||y - (b_dec + f[:P] W_dec[:P])||² / N, with gradients
    reaching only the decoder rows of each prefix's latents."""
    torch.manual_seed(0)
    kind = dictionaries.get("matryoshka")
    sae = kind.build(16, 64, k=4, prefixes=[8, 32, 64], n=2)
    sae.initialize([torch.Generator().manual_seed(s) for s in (1, 2)])
    assert sae.options[0].prefixes == [8, 32]  # the full dictionary is implied
    x = torch.randn(50, 16)
    codes = sae.encode(x, training=True)
    got = sae.extra_loss(codes, x, 50)
    f = codes.dense().detach()
    want = torch.zeros(2)
    for P in (8, 32):
        recon = f[..., :P] @ sae.W_dec[:, :P].detach() + sae.b_dec.detach().unsqueeze(1)
        want += (x - recon).pow(2).sum((-1, -2)) / 50
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert sae.W_dec.grad[:, 32:].abs().sum() == 0 and sae.W_dec.grad[:, :8].abs().sum() > 0


def test_bad_prefixes_are_one_line(lake_dir):
    code, _, err = lake_main(
        "train",
        "--lake",
        lake_dir,
        "--run",
        "r1",
        "--hook",
        H1,
        "--arch",
        "matryoshka",
        "--prefixes",
        "32,8",
        "--expansion",
        "2",
        "--tokens",
        "512",
        "--quiet",
    )
    assert code == 2 and err.startswith("error: SAE ") and "prefixes must increase strictly" in err, err
    code, _, err = lake_main(
        "train",
        "--lake",
        lake_dir,
        "--run",
        "r1",
        "--hook",
        H1,
        "--arch",
        "matryoshka",
        "--prefixes",
        "8,x",
        "--tokens",
        "512",
        "--quiet",
    )
    assert code == 2 and "--prefixes must be integers" in err, err


def _prefix_fvu(sae, x: torch.Tensor, P: int) -> float:
    """FVU of the reconstruction from the first P latents alone (inference codes)."""
    f = sae.encode(x).dense()[0]
    recon = f[:, :P] @ sae.W_dec[0, :P] + sae.b_dec[0]
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_a_trained_prefix_reconstructs_alone(lake_dir):
    """Trained alike, the first 8 and 24 of 64 latents of a Matryoshka SAE reconstruct better on their own
    than the first 8 and 24 of a plain BatchTopK's (measured: 0.77 vs 0.91, 0.52 vs 0.73); the full
    dictionaries are close (0.36 vs 0.33)."""
    common = [
        "--lake",
        lake_dir,
        "--run",
        "r1",
        "--hook",
        H1,
        "--d-sae",
        "64",
        "--k",
        "4",
        "--tokens",
        "12000",
        "--batch-size",
        "256",
        "--repeat",
        "--lr",
        "0.01",
        "--holdout",
        "0",
        "--quiet",
    ]
    for name, extra in (("m", ["--arch", "matryoshka", "--prefixes", "8,24"]), ("b", ["--arch", "batchtopk"])):
        code, out, err = lake_main("train", *common, "--name", name, *extra)
        assert code == 0, err
    store = SAEStore(lake_dir)
    m, m_cfg = store.load("m")
    b, _ = store.load("b")
    assert m_cfg["hyperparameters"]["prefixes"] == [8, 24] and type(m).__name__ == "Matryoshka"
    x = next(SnapshotSource(lake_dir, "r1").token_batches(2048, [H1])).acts[H1].float()
    (m8, m24, m_full), (b8, b24, b_full) = ([_prefix_fvu(sae, x, P) for P in (8, 24, 64)] for sae in (m, b))
    assert m8 < 0.9 * b8 and m24 < 0.8 * b24, (m8, b8, m24, b24)
    assert m_full < 1.3 * b_full, (m_full, b_full)


def test_resume_is_bitwise_and_export_is_jumprelu(lake_dir, tmp_path):
    """An interrupted Matryoshka run resumed equals the uninterrupted one; it exports to SAELens as
    what it is at inference (JumpReLU with its threshold), latents in their nested order."""
    import json

    args = [
        "--lake",
        lake_dir,
        "--run",
        "r1",
        "--hook",
        H1,
        "--arch",
        "matryoshka",
        "--prefixes",
        "8,24",
        "--d-sae",
        "64",
        "--k",
        "4",
        "--tokens",
        "4096",
        "--batch-size",
        "256",
        "--holdout",
        "0",
        "--checkpoint-every",
        "4",
        "--repeat",
        "--quiet",
    ]
    code, _, err = lake_main("train", *args, "--name", "a")
    assert code == 0, err
    code, out, err = lake_main("train", *args, "--name", "b", "--stop-after", "8")
    assert code == 0 and "interrupted" in out, err
    code, _, err = lake_main("train", *args, "--name", "b", "--resume")
    assert code == 0, err
    wa, wb = SAEStore(lake_dir).weights("a"), SAEStore(lake_dir).weights("b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    code, _, err = lake_main("export", "--lake", lake_dir, "a", "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["architecture"] == "jumprelu"
