"""The steering box on a feature page, in headless Chromium: both continuations side by side and the
promoted tokens' log-prob changes, the same as `lake steer`; bad input shown as one message."""

from __future__ import annotations

import json

from tests.conftest import cli


def test_steering_box_shows_what_lake_steer_prints(page, server, web_lake):
    page.goto(server + "/sae/web-sae/feature/5?analysis=web-sae")
    page.fill("#steer textarea[name=prompt]", "The target list contains")
    page.select_option("#steer select[name=mode]", "clamp")
    page.fill("#steer input[name=value]", "3")
    assert page.input_value("#steer input[name=value]") == "3"
    page.fill("#steer input[name=tokens]", "5")
    page.click("#steer button[type=submit]")
    page.wait_for_selector("#steer-promoted", timeout=120_000)  # the first call loads the model
    want = json.loads(
        cli(
            "steer",
            "--lake",
            web_lake["lake"],
            "web-sae",
            "--prompt",
            "The target list contains",
            "--feature",
            "5",
            "--value",
            "3",
            "--mode",
            "clamp",
            "--tokens",
            "5",
            "--json",
        )[1]
    )
    assert page.inner_text("#steer-baseline") == want["baseline"]["text"].strip()
    assert page.inner_text("#steer-steered") == want["steered"]["text"].strip()
    assert page.locator("#steer-promoted tbody tr").count() == len(want["promoted"])
    # a prompt the model cannot read: one message, no page error
    page.fill("#steer textarea[name=prompt]", "word " * 100)
    page.click("#steer button[type=submit]")
    page.wait_for_selector("#steer-out .err")
    assert "reads at most" in page.inner_text("#steer-out .err")
