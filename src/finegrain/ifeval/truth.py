"""Exact token-level ground truth for the token-local instructions, and the minimal fixes that remove violations.

A token-local instruction (:data:`finegrain.ifeval.instructions.TOKEN_LOCAL`) is violated by identifiable
characters of the response, found exactly as IFEval's checkers look for them (Zhou et al. 2023, arXiv 2311.07911):

* ``punctuation:no_comma``: every ``,`` (the checker searches ``r"\\,"``);
* ``change_case:english_lowercase``: every uppercase or titlecase character (``str.isupper``, or Unicode
  category Lt), exactly the characters that make ``response.islower()`` false; runs of them form one span;
* ``change_case:english_capital``: every lowercase or titlecase character (``str.islower`` or Lt), what makes
  ``response.isupper()`` false, in runs;
* ``keywords:forbidden_words``: every match of ``r"\\b" + word + r"\\b"`` with ``re.IGNORECASE``, the checker's own
  pattern, for each forbidden word.

The case checkers also require English (``langdetect``) and a response with at least one cased letter; those parts
are not located on characters and are not part of the truth. A response has no violation span exactly when the
located part of every token-local instruction is satisfied.

Token truth (:func:`token_truth`) maps the union of the violation spans through the tokenizer's character offsets
with :func:`finegrain.data.spans_to_labels`: **-1** for a token overlapping any violating character (also one that
mixes it with clean text), **+1** for another token with non-whitespace text, **0** for whitespace-only tokens and
EOS. docs/ifeval.md ("Token truth") gives the reasons: the +1 class makes the token-credit AUROC defined, without
claiming that clean tokens made the response good.

:func:`minimal_fix` is the rule-based reviser: it deletes commas, lowercases or uppercases the violating characters,
and deletes forbidden words (with one adjacent space), touching nothing else, so that edit alignment between a
response and its fix marks exactly the violating tokens.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finegrain.errors import DataError
from finegrain.ifeval.instructions import CAPITAL, FORBIDDEN, LOWERCASE, NO_COMMA, TOKEN_LOCAL

__all__ = ["Violation", "merge_spans", "minimal_fix", "token_truth", "violations"]


@dataclass(frozen=True)
class Violation:
    """Characters ``[start, end)`` of a response that break instruction ``instruction_id``."""

    start: int
    end: int
    instruction_id: str


def _runs(text: str, bad) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i, ch in enumerate(text):
        if bad(ch):
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
    return out


def _titlecase(ch: str) -> bool:
    """A titlecase letter (category Lt, e.g. "ǅ"); ``str.istitle`` is no test of that, it is True for "D"."""
    return unicodedata.category(ch) == "Lt"


def _breaks_lowercase(ch: str) -> bool:
    """What makes ``str.islower`` false: an uppercase or titlecase character."""
    return ch.isupper() or _titlecase(ch)


def _breaks_capital(ch: str) -> bool:
    """What makes ``str.isupper`` false: a lowercase or titlecase character."""
    return ch.islower() or _titlecase(ch)


def _forbidden_pattern(word: str) -> re.Pattern:
    return re.compile(r"\b" + word + r"\b", flags=re.IGNORECASE)  # IFEval's ForbiddenWords pattern, unescaped as there


def violations(response: str, instruction_id_list: Sequence[str], kwargs: Sequence[Mapping[str, Any]]) -> list[Violation]:
    """Every located violation of the token-local instructions in ``response``, sorted by position.

    Args:
        response: the response text as the checkers see it.
        instruction_id_list: the prompt's instruction ids (content instructions are ignored).
        kwargs: one dict of arguments per instruction id.

    Returns:
        Violations sorted by ``(start, end)``; spans of different instructions may overlap.

    Example:
        >>> [(v.start, v.end) for v in violations("Lava, hot lava.", ["punctuation:no_comma",
        ...     "keywords:forbidden_words"], [{}, {"forbidden_words": ["lava"]}])]
        [(0, 4), (4, 5), (10, 14)]
    """
    if len(instruction_id_list) != len(kwargs):
        raise DataError(f"{len(instruction_id_list)} instruction ids but {len(kwargs)} kwargs", field="kwargs")
    out: list[Violation] = []
    for instruction_id, args in zip(instruction_id_list, kwargs):
        if instruction_id == NO_COMMA:
            spans = [(m.start(), m.end()) for m in re.finditer(r"\,", response)]
        elif instruction_id == LOWERCASE:
            spans = _runs(response, _breaks_lowercase)
        elif instruction_id == CAPITAL:
            spans = _runs(response, _breaks_capital)
        elif instruction_id == FORBIDDEN:
            words = (args or {}).get("forbidden_words") or []
            spans = [(m.start(), m.end()) for w in words for m in _forbidden_pattern(w).finditer(response)]
        else:
            continue
        out += [Violation(s, e, instruction_id) for s, e in spans if e > s]
    return sorted(out, key=lambda v: (v.start, v.end, v.instruction_id))


def merge_spans(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of character spans as sorted, disjoint spans (touching spans are merged).

    Example:
        >>> merge_spans([(4, 5), (0, 4), (10, 14), (12, 13)])
        [(0, 5), (10, 14)]
    """
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def token_truth(text: str, offsets: Sequence[tuple[int, int]], found: Sequence[Violation]) -> list[int]:
    """Per-token ground truth from located violations (see the module docstring).

    ``truth[t] = -1`` if token ``t``'s characters ``[a, b)`` overlap any violation, else ``+1`` if ``text[a:b]``
    has a non-whitespace character, else ``0``.

    Args:
        text: the response text the offsets index.
        offsets: ``(start, end)`` character offsets of the tokens (``(len, len)`` for an appended EOS).
        found: the response's violations (:func:`violations`).

    Returns:
        One integer in ``{-1, 0, 1}`` per token.

    Example:
        >>> token_truth("Hi, you", [(0, 2), (2, 3), (3, 7), (7, 7)],
        ...             [Violation(2, 3, "punctuation:no_comma")])
        [1, -1, 1, 0]
    """
    from finegrain.data import spans_to_labels

    union = [(s, e, -1) for s, e in merge_spans([(v.start, v.end) for v in found])]
    negative = spans_to_labels([tuple(o) for o in offsets], union, fill=0)
    return [-1 if neg == -1 else (1 if text[a:b].strip() else 0) for neg, (a, b) in zip(negative, offsets)]


def _apply_deletions(text: str, spans: Sequence[tuple[int, int]], *, eat_space: bool) -> str:
    """``text`` without ``spans``; with ``eat_space`` one adjacent space goes too (the following one, else the
    preceding one), so that deleting a word leaves single spacing."""
    out, cursor = [], 0
    for s, e in merge_spans(spans):
        if s < cursor:
            s = cursor
        if eat_space:
            if e < len(text) and text[e] == " " and (s == 0 or text[s - 1] in " \n\t"):
                e += 1
            elif s > cursor and text[s - 1] == " ":
                s -= 1
        out.append(text[cursor:s])
        cursor = max(cursor, e)
    out.append(text[cursor:])
    return "".join(out)


def minimal_fix(response: str, instruction_id_list: Sequence[str], kwargs: Sequence[Mapping[str, Any]]) -> str:
    """The response with every located violation of its token-local instructions removed, and nothing else changed.

    Forbidden words are deleted first (each with one adjacent space), then commas are deleted, then the violating
    letters are lowercased (all-lowercase) or uppercased (all-capitals). The result has no located violation
    (checked; a fix that would leave one, e.g. a letter whose case mapping is itself cased the wrong way, raises).

    Raises:
        DataError: the fix does not remove every violation.

    Example:
        >>> minimal_fix("Lava flows, slowly.", ["keywords:forbidden_words", "punctuation:no_comma",
        ...     "change_case:english_lowercase"], [{"forbidden_words": ["lava"]}, {}, {}])
        'flows slowly.'
    """
    ids, args = list(instruction_id_list), list(kwargs)
    text = response
    for step in (FORBIDDEN, NO_COMMA):
        if step in ids:
            i = ids.index(step)
            spans = [(v.start, v.end) for v in violations(text, [step], [args[i]])]
            text = _apply_deletions(text, spans, eat_space=step == FORBIDDEN)
    if LOWERCASE in ids:
        text = "".join(c.lower() if _breaks_lowercase(c) else c for c in text)
    if CAPITAL in ids:
        text = "".join(c.upper() if _breaks_capital(c) else c for c in text)
    left = violations(text, [i for i in ids if i in TOKEN_LOCAL], [a for i, a in zip(ids, args) if i in TOKEN_LOCAL])
    if left:
        raise DataError(f"the rule-based fix leaves {len(left)} violation(s), e.g. {left[0]} in {text[:80]!r}",
                        field="response")
    return text
