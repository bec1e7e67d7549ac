"""`lake train`'s options: defaults shown in --help come from the config classes; the schedule options work."""

from __future__ import annotations

import dataclasses
import re

import pytest

from saelake.train import SAEStore, dictionaries
from saelake.train.config import BaseSAEConfig, SourceConfig
from tests.train.conftest import H1, lake_main


def _help() -> str:
    code, out, err = lake_main("train", "--help")
    assert code == 0, err
    return " ".join(out.split())  # click wraps lines


def _default(cls, key):
    return next(f.default for f in dataclasses.fields(cls) if f.name == key)


def test_help_shows_the_config_classes_defaults():
    text = _help()
    for key in ("lr_warmup", "lr_decay", "outlier_factor", "normalize", "seed"):
        flag = "--" + key.replace("_", "-")
        assert re.search(rf"{flag} \S+ .*?\(default {re.escape(str(_default(BaseSAEConfig, key)))}\)", text), key
    for key in ("batch_size", "context_size", "device"):
        assert f"(default {_default(SourceConfig, key)})" in text
    for kind in dictionaries.kinds():  # every kind's every key, with that kind's default
        for f in dataclasses.fields(kind.Options):
            flag = "--" + f.name.replace("_", "-")
            assert flag in text and kind.name in text
            if f.default is not None and f.default is not False:  # as written in the option, or the value
                assert f"(default {f.metadata.get('shown') or f.default})" in text, (kind.name, f.name)
    assert "--arch [" + "|".join(dictionaries.names()) + "]" in text  # the choices are the registry's


@pytest.mark.parametrize("warmup,decay", [(0.5, 0.0), (0.0, 0.5)])
def test_lr_warmup_and_decay_options(lake_dir, warmup, decay):
    code, _, err = lake_main(
        "train",
        "--lake",
        lake_dir,
        "--run",
        "r1",
        "--hook",
        H1,
        "--k",
        "4",
        "--expansion",
        "2",
        "--tokens",
        "2560",
        "--batch-size",
        "256",
        "--lr",
        "0.01",
        "--lr-warmup",
        str(warmup),
        "--lr-decay",
        str(decay),
        "--log-every",
        "1",
        "--holdout",
        "0",
        "--name",
        "s",
        "--quiet",
    )
    assert code == 0, err
    hp = SAEStore(lake_dir).config("s")["hyperparameters"]
    assert (hp["lr_warmup"], hp["lr_decay"]) == (warmup, decay)
    lrs = [r["value"] for r in SAEStore(lake_dir).metrics("s") if r["name"] == "lr"]
    assert len(lrs) == 10
    if warmup:  # 5 warm-up steps, then flat
        assert lrs[:6] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01, 0.01])
        assert lrs[-1] == pytest.approx(0.01)
    else:  # flat, then 5 decay steps down to 0.002
        assert lrs[0] == pytest.approx(0.01) and lrs[-5:] == pytest.approx([0.01, 0.008, 0.006, 0.004, 0.002])


def test_schedule_options_are_checked(lake_dir):
    code, _, err = lake_main(
        "train",
        "--lake",
        lake_dir,
        "--run",
        "r1",
        "--hook",
        H1,
        "--tokens",
        "512",
        "--lr-warmup",
        "1.5",
        "--name",
        "s",
        "--quiet",
    )
    assert code == 2 and err.startswith("error: SAE s: lr_warmup is a fraction of the steps (0..1), got 1.5"), err
