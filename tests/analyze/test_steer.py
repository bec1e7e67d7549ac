"""``lake steer`` end to end on the tiny model: both continuations side by side, the promoted
tokens' log-prob changes, --json, and bad input as one line with exit 2."""

from __future__ import annotations

import json

import pytest

from tests.analyze.conftest import cli, make_sae


def test_steer_prints_both_continuations_and_the_promoted_tokens(alake):
    code, out, err = cli(
        "steer",
        "--lake",
        alake,
        "topk",
        "--prompt",
        "The old man and the sea",
        "--feature",
        "3",
        "--value",
        "5",
        "--tokens",
        "6",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("sae topk feature 3: add 5 at all positions (error term kept)")
    assert "baseline" in lines[2] and "│ steered" in lines[2]
    assert "top promoted tokens" in out and "mean change" in out
    code, out, err = cli(
        "steer",
        "--lake",
        alake,
        "topk",
        "--prompt",
        "The old man and the sea",
        "--feature",
        "3",
        "--value",
        "5",
        "--tokens",
        "6",
        "--mode",
        "clamp",
        "--positions",
        "0,-1",
        "--json",
        "--top",
        "4",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["mode"] == "clamp" and res["positions"] == [0, len(res["prompt_tokens"]) - 1]
    assert len(res["baseline"]["ids"]) == len(res["steered"]["ids"]) == 6
    assert len(res["promoted"]) == 4 and res["mean_logprob_change"] == pytest.approx(
        sum(r["change"] for r in res["promoted"]) / 4
    )
    # greedy: the same answer twice
    assert (
        json.loads(
            cli(
                "steer",
                "--lake",
                alake,
                "topk",
                "--prompt",
                "The old man and the sea",
                "--feature",
                "3",
                "--value",
                "5",
                "--tokens",
                "6",
                "--mode",
                "clamp",
                "--positions",
                "0,-1",
                "--json",
                "--top",
                "4",
            )[1]
        )["steered"]
        == res["steered"]
    )


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--feature", "64", "--value", "1"], "no feature 64"),
        (["--feature", "-1", "--value", "1"], "no feature -1"),
        (["--feature", "1", "--value", "nan"], "finite number"),
        (["--feature", "1", "--value", "inf"], "finite number"),
        (["--feature", "1", "--value", "1", "--prompt", "word " * 80], "reads at most 64"),
        (["--feature", "1", "--value", "1", "--tokens", "60"], "exceed"),
        (["--feature", "1", "--value", "1", "--positions", "0,x"], "--positions"),
        (["--feature", "1", "--value", "1", "--positions", "40"], "outside the prompt"),
        (["--feature", "1", "--value", "1", "--prompt", "  "], "prompt is empty"),
    ],
)
def test_bad_steer_input_is_one_line(alake, args, msg):
    full = ["steer", "--lake", alake, "topk", "--prompt", "The old man", *args]
    if args.count("--prompt"):
        full = full[:4] + full[6:]  # the case's own prompt replaces the default one
    code, out, err = cli(*full)
    assert code == 2, (out, err)
    assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_steer_on_a_hook_the_model_lacks(lake_copy, tiny_model):
    make_sae(lake_copy, "far", "topk", "blocks.7.hook_resid_post", model=tiny_model)
    code, out, err = cli(
        "steer", "--lake", lake_copy, "far", "--prompt", "The old man", "--feature", "1", "--value", "1"
    )
    assert code == 2 and "unknown hook 'blocks.7.hook_resid_post'" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("steer", "--lake", lake_copy, "nosuch", "--prompt", "x", "--feature", "1", "--value", "1")
    assert code == 2 and "no SAE 'nosuch'" in err


def test_steer_example_runs(alake):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    p = subprocess.run(
        [
            sys.executable,
            str(repo / "examples" / "steer.py"),
            "--lake",
            alake,
            "--sae",
            "topk",
            "--feature",
            "3",
            "--value",
            "5",
            "--tokens",
            "4",
            "--prompt",
            "The old man",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert p.returncode == 0, p.stderr
    assert "error term kept: max |logit change| 0.00e+00" in p.stdout
    for mode in ("add", "clamp", "ablate", "plain"):
        assert f"{mode:>6}: The old man" in p.stdout
    assert "top promoted tokens" in p.stdout


def test_ui_steering_endpoint_shares_the_live_model(lake_copy):
    """POST /api/steer answers what lake steer prints, on the model live inference loaded (once)."""
    from saelake.analyze.web.server import WebApp

    alake = lake_copy
    assert cli("analyze", "--lake", alake, "topk", "--tokens", "256", "--quiet")[0] == 0
    app = WebApp(alake)
    body = {"sae": "topk", "prompt": "The old man", "feature": 3, "value": 5, "mode": "add", "tokens": 4}
    code, _, out, _ = app.handle("POST", "/api/steer", json.dumps(body).encode())
    assert code == 200, out
    res = json.loads(out)
    cli_res = json.loads(
        cli(
            "steer",
            "--lake",
            alake,
            "topk",
            "--prompt",
            "The old man",
            "--feature",
            "3",
            "--value",
            "5",
            "--tokens",
            "4",
            "--json",
        )[1]
    )
    assert res["steered"] == cli_res["steered"] and res["baseline"] == cli_res["baseline"]
    assert res["mean_logprob_change"] == pytest.approx(cli_res["mean_logprob_change"], abs=1e-5)
    models = dict(app.live._models)
    code, _, out, _ = app.handle("POST", "/api/live", json.dumps({"sae": "topk", "text": "The old man"}).encode())
    assert code == 200 and app.live._models == models  # live inference reuses the model the steering box loaded
    for bad, msg in (
        ({"value": float("nan")}, "finite"),
        ({"feature": 999}, "no feature 999"),
        ({"prompt": ""}, "type a prompt"),
        ({"value": "x"}, "must be a number"),
    ):
        code, _, out, _ = app.handle("POST", "/api/steer", json.dumps(body | bad).encode())
        assert code == 400 and msg in json.loads(out)["error"], out
    code, _, out, _ = app.handle("GET", "/sae/topk/feature/3")
    assert code == 200 and b'id="steer"' in out and b"runSteer" in out
