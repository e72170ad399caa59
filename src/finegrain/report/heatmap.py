"""Token-reward heatmaps as HTML strings (pure string building; no JavaScript).

One heatmap shows one example response: one row per reward source, the ground truth (``"truth"``) first,
each token a ``<span>`` coloured on a diverging scale. Every row is normalised by its own max |value|, so
sources on different scales (a ``2·P(+)-1`` discriminator, a summed log-ratio) are comparable by sign and
relative size; the exact value is in each token's hover text (``title``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

__all__ = ["HEATMAP_CSS", "heatmap_legend", "render_heatmap", "token_color"]

# ColorBrewer RdBu end points and midpoint: a diverging palette that stays distinguishable under the common
# colour-vision deficiencies (blue versus red differ in lightness as well as hue).
_NEGATIVE = (33, 102, 172)  # #2166ac
_MIDDLE = (247, 247, 247)  # #f7f7f7
_POSITIVE = (178, 24, 43)  # #b2182b
_MISSING = "#bdbdbd"

# Tokens that are only whitespace would render as nothing; these visible stand-ins keep them readable.
_WHITESPACE_SYMBOLS = {" ": "\u2423", "\n": "\u21b5", "\t": "\u2192", "\r": "\u240d"}
_BREAK_SYMBOLS = str.maketrans({k: v for k, v in _WHITESPACE_SYMBOLS.items() if k != " "})

HEATMAP_CSS = """
.heatmap { margin: 0.6em 0 1.2em 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 13px; }
.heatmap .heatmap-prompt { color: #444; margin-bottom: 0.3em; font-family: system-ui, sans-serif; }
.heatmap .heatmap-row { display: flex; align-items: flex-start; margin: 2px 0; }
.heatmap .heatmap-label { flex: 0 0 11em; font-weight: 600; font-family: system-ui, sans-serif;
  padding-right: 0.5em; text-align: right; }
.heatmap .heatmap-label small { font-weight: 400; color: #666; display: block; }
.heatmap .heatmap-tokens { flex: 1; line-height: 1.9; }
.heatmap .tok { white-space: pre; padding: 1px 2px; margin-right: 2px; border-radius: 3px;
  border: 1px solid #ddd; }
.heatmap .tok.ws { color: #777; }
.heatmap-legend { font-family: system-ui, sans-serif; font-size: 13px; color: #333; margin: 0.5em 0; }
.heatmap-legend .scale { display: inline-block; width: 12em; height: 0.9em; vertical-align: middle;
  border: 1px solid #ccc; margin: 0 0.4em;
  background: linear-gradient(to right, #2166ac, #f7f7f7, #b2182b); }
"""


def token_color(x: float) -> tuple[str, str]:
    """Background and text colour for a normalised value ``x`` in [-1, 1] (clamped).

    The background is a linear blend from the neutral midpoint to the blue (x < 0) or red (x > 0) end point
    by ``|x|``; the text turns white on the darker third of the scale so that it stays legible. NaN maps to
    grey.

    Returns:
        ``(background, foreground)`` as ``#rrggbb`` strings.
    """
    if math.isnan(x):
        return _MISSING, "#000000"
    x = max(-1.0, min(1.0, x))
    end = _POSITIVE if x > 0 else _NEGATIVE
    a = abs(x)
    rgb = tuple(round(m + (e - m) * a) for m, e in zip(_MIDDLE, end))
    foreground = "#ffffff" if a > 0.6 else "#000000"
    return "#{:02x}{:02x}{:02x}".format(*rgb), foreground


def _display_text(token: str) -> tuple[str, bool]:
    """The text shown for a token and whether it is whitespace-only (shown with visible symbols)."""
    if token == "":
        return "\u2205", True
    if token.strip() == "":
        return "".join(_WHITESPACE_SYMBOLS.get(ch, "\u2423") for ch in token), True
    # Line breaks and tabs inside a token would break the row; show them as symbols too.
    return token.translate(_BREAK_SYMBOLS), False


def heatmap_legend() -> str:
    """An HTML legend explaining the colour scale (shared by all heatmaps on a page)."""
    return (
        '<div class="heatmap-legend">'
        'negative<span class="scale"></span>positive &mdash; '
        "blue is negative, white is zero, red is positive. Each row (reward source) is normalised by its own "
        "max |value|, shown under its name, so colours compare signs and relative sizes within a row, not "
        "magnitudes across rows. Hover a token for its exact value. "
        "Whitespace tokens are shown as \u2423 (space), \u21b5 (newline), \u2192 (tab); \u2205 is an empty token."
        "</div>"
    )


def render_heatmap(
    tokens: Sequence[str],
    sources: Mapping[str, Sequence[float]],
    prompt: str | None = None,
    title: str | None = None,
) -> str:
    """One example's token-reward heatmap as an HTML fragment.

    ``<div class="heatmap">`` holds an optional title and prompt, then one ``<div class="heatmap-row"
    data-source="NAME">`` per source (``truth`` first), whose tokens are ``<span class="tok">`` elements
    with background ``token_color(v_t / max_t |v_t|)`` and a ``title`` giving the source, the token and the
    exact value. All text is HTML-escaped.

    Args:
        tokens: ``(T,)`` response tokens as text.
        sources: source name -> ``(T,)`` per-token values (rewards or ground-truth credit).
        prompt: the prompt, shown above the rows.
        title: a caption, shown first.

    Returns:
        The HTML fragment (include :data:`HEATMAP_CSS` once in the page's ``<style>``).

    Raises:
        ValueError: if a source's length differs from the number of tokens (the message names the source).
    """
    tokens = [str(t) for t in tokens]
    parts = ['<div class="heatmap">']
    if title is not None:
        parts.append(f'<div class="heatmap-title"><strong>{html.escape(title)}</strong></div>')
    if prompt is not None:
        parts.append(f'<div class="heatmap-prompt">prompt: {html.escape(prompt)}</div>')
    for name in sorted(sources, key=lambda n: n != "truth"):  # the ground truth first, the others in order
        values = [float(v) if v is not None else math.nan for v in sources[name]]
        if len(values) != len(tokens):
            raise ValueError(f"heatmap source '{name}' has {len(values)} values for {len(tokens)} tokens")
        scale = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
        parts.append(f'<div class="heatmap-row" data-source="{html.escape(name, quote=True)}">')
        parts.append(f'<div class="heatmap-label">{html.escape(name)}<small>max |v| = {scale:.3g}</small></div>'
                     '<div class="heatmap-tokens">')
        for token, v in zip(tokens, values):
            # NaN stays NaN (grey); an all-zero row is all white
            background, foreground = token_color(v if math.isnan(v) else v / scale if scale > 0 else 0.0)
            shown, is_ws = _display_text(token)
            hover = html.escape(f"{name} | {token!r} = {v:+.4f}", quote=True)
            parts.append(f'<span class="{"tok ws" if is_ws else "tok"}" style="background:{background};'
                         f'color:{foreground}" data-value="{v!r}" title="{hover}">'
                         f"{html.escape(shown)}</span>")
        parts.append("</div></div>")
    parts.append("</div>")
    return "".join(parts)
