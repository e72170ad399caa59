import re

import pytest

from finegrain.report.heatmap import render_heatmap, token_color


def spans(fragment: str) -> list[str]:
    return re.findall(r'<span class="tok[^"]*"[^>]*>.*?</span>', fragment)


def test_special_characters_are_escaped_in_text_and_hover():
    tokens = ["<script>", "a&b", '"q"', "it's", ">"]
    out = render_heatmap(tokens, {"truth": [1, -1, 0, 0.5, 0]}, prompt="<b>bold & 'quoted'</b>", title="<i>")
    assert "<script>" not in out and "<b>" not in out and "<i>" not in out
    assert "&lt;script&gt;" in out and "a&amp;b" in out and "&quot;q&quot;" in out and "&gt;" in out
    assert "&lt;b&gt;bold &amp; &#x27;quoted&#x27;&lt;/b&gt;" in out
    # Hover text (title attribute) is escaped too, so no attribute can be closed early by a token.
    for title in re.findall(r'title="([^"]*)"', out):
        assert "<" not in title and ">" not in title and "'" not in title
    assert len(spans(out)) == len(tokens)


def test_one_row_per_source_truth_first():
    out = render_heatmap(["a", "b"], {"token_rm": [0.1, 0.2], "truth": [1.0, 0.0], "sentence_rm": [0.0, 0.3]})
    rows = re.findall(r'<div class="heatmap-row" data-source="([^"]+)">', out)
    assert rows == ["truth", "token_rm", "sentence_rm"]
    assert out.count('class="heatmap"') == 1
    assert len(spans(out)) == 6


def test_colour_sign_and_per_source_normalisation():
    """Red channel dominates for positive values, blue for negative, white-ish at 0; a row is scaled by its
    max |value|, so the largest |value| of each row gets the full end colour whatever its magnitude."""
    assert token_color(1.0)[0] == "#b2182b"
    assert token_color(-1.0)[0] == "#2166ac"
    assert token_color(0.0)[0] == "#f7f7f7"
    r, g, b = (int(token_color(0.5)[0][i : i + 2], 16) for i in (1, 3, 5))
    assert r > b
    r, g, b = (int(token_color(-0.5)[0][i : i + 2], 16) for i in (1, 3, 5))
    assert b > r
    out = render_heatmap(["x", "y", "z"], {"truth": [2.0, -4.0, 0.0], "small": [0.001, 0.0, -0.0005]})
    backgrounds = re.findall(r"background:(#[0-9a-f]{6})", out)
    assert backgrounds[:3] == [token_color(0.5)[0], "#2166ac", "#f7f7f7"]
    assert backgrounds[3:] == ["#b2182b", "#f7f7f7", token_color(-0.5)[0]]
    assert 'title="truth | &#x27;y&#x27; = -4.0000"' in out


def test_all_zero_row_nan_and_whitespace_tokens():
    out = render_heatmap([" ", "\n", "", "a b"], {"truth": [0, 0, 0, 0], "rm": [float("nan"), 1, 0, 0]})
    assert out.count("background:#f7f7f7") >= 4  # an all-zero row is white, not NaN
    assert "background:#bdbdbd" in out  # NaN is grey
    assert 'class="tok ws"' in out
    assert "\u2423" in out and "\u21b5" in out and "\u2205" in out
    assert ">a b<" in out  # inner spaces are kept (white-space: pre)


def test_length_mismatch_names_the_source():
    with pytest.raises(ValueError, match="'rm'"):
        render_heatmap(["a", "b"], {"truth": [1, 0], "rm": [1.0]})
