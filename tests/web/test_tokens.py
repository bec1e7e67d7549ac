"""How tokens are drawn: visible whitespace, bytes spelled <0xNN> with their id, the peak marked, windows."""

from __future__ import annotations

from saelake.analyze.directions import token_strings
from saelake.analyze.web.tokens import WINDOW_AFTER, WINDOW_BEFORE, peak_flags, sample_html, shown


def test_shown_tokens():
    assert shown(" ") == ("·", " ws") and shown("\n\n") == ("↵↵", " ws") and shown("\t ") == ("⇥·", " ws")
    assert shown("") == ("∅", " ws") and shown(" the") == (" the", "")
    assert shown("\xa0 ") == ("\\xa0·", " ws") and shown("\u200b") == ("\\u200b", " ws")
    assert shown("a\x07") == ("a\\x07", " ws")
    assert shown("<0xE6>") == ("<0xE6>", " byte") and shown(" <0xF0><0x9F>") == (" <0xF0><0x9F>", " byte")
    assert shown("\ufffd") == ("\ufffd", " byte")  # analyses written before bytes were spelled


def test_byte_tokens_are_spelled_by_their_bytes(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok("a 日本", add_special_tokens=False)["input_ids"]
    strs = token_strings(tok, ids)
    assert tok.batch_decode([[i] for i in ids])[-1] == "\ufffd"  # what plain decoding shows
    assert "".join(strs) == "a " + "".join(f"<0x{b:02X}>" for b in "日本".encode())


def test_window_peak_and_flags():
    T = 60
    sample = {
        "tokens": [0] + list(range(10, 10 + T - 1)),
        "strs": ["<bos>"] + [f"w{i}" for i in range(1, T)],
        "positions": [3, 40],
        "acts": [0.5, 2.0],
        "context_id": 7,
    }
    html = str(sample_html(sample, 2.0, {0}))
    assert html.count('class="t') == WINDOW_BEFORE + WINDOW_AFTER + 1  # only the window is sent
    assert html.count("peak") == 1 and 'data-i="40"' in html.split("peak")[1][:40]
    assert html.count('class="more" data-context="7"') == 2
    assert str(sample_html(sample, 2.0, {0}, "full")).count('class="t') == T
    assert str(sample_html(sample, 2.0, {0}, "all")).count(" far") == T - (WINDOW_BEFORE + WINDOW_AFTER + 1)
    assert peak_flags(sample, {0}, None, None) == []
    early = {**sample, "acts": [2.5, 2.0]}  # peak at position 3, right after BOS
    assert peak_flags(early, {0}, None, None) == ["early"]
    norms = [1.0] * T
    norms[40] = 50.0
    assert peak_flags(sample, {0}, norms, 10.0) == ["high-norm"]
