"""Sentence segmentation of responses and the mapping of sentences to policy tokens.

Used by the sentence-level reward model (SRM, Qiu et al. 2025, arXiv 2503.04793; docs/methods/reward-models.md)
and by sentence-level reward placement.

A splitter maps a text to character spans, one per sentence. Every splitter here returns spans that are

* sorted, disjoint and non-empty;
* trimmed: a span neither starts nor ends with whitespace (the whitespace between sentences belongs to none);
* complete: every non-whitespace character of the text lies in exactly one span (no character is lost).

Splitters:

* :class:`RuleSplitter` (default, no download): splits after ``.``, ``!``, ``?`` (and ``…``) followed by
  whitespace, after the full-width ``。！？``, and at newlines; a period after a common abbreviation, a single capital initial or a line-leading
  list number, or one followed by a lowercase word, does not end a sentence; decimals and URLs are never split
  (no whitespace after their dots); fragments shorter than ``min_chars`` non-space characters are merged.
* :class:`PunctuationSplitter`: cuts at every terminator run followed by whitespace, with no abbreviation or case
  rules (lowercase text such as the built-in world's).
* :class:`SaTSplitter`: wraps ``wtpsplit``'s Segment-any-Text model (``sat-3l`` with threshold 0.2 in the SRM
  code), used only when ``wtpsplit`` is installed (``pip install finegrain[sat]``) and the model is on disk.

Tokens are matched to sentences by character offsets (:func:`token_sentence_ids`, :func:`sentence_token_ends`),
never by re-tokenising. :func:`make_splitter` / :func:`splitter_config` rebuild a splitter from the config a saved
reward model records. The two SRM boundary modes build on them:

* (a) :func:`insert_end_tokens`: ``prompt <END> s_1 <END> … s_N EOS <END>``, the SRM training layout;
* (b) :func:`mark_sentence_ends`: no new tokens; the last prompt token is ``e_0`` and the last token of each
  sentence is ``e_j`` (the RL-side mapping).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from finegrain.data.alignment import as_offsets
from finegrain.errors import ConfigError, DataError

Span = tuple[int, int]


@runtime_checkable
class SentenceSplitter(Protocol):
    """Anything that cuts a text into sentence spans.

    ``split(text)`` returns a list of ``(start, end)`` character spans, sorted, disjoint, non-empty, trimmed of
    surrounding whitespace, and together covering every non-whitespace character of ``text``.
    """

    def split(self, text: str) -> list[Span]: ...


def _trimmed(text: str, start: int, end: int) -> Span | None:
    """``[start, end)`` without leading/trailing whitespace, or None if only whitespace is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


# Words after which a period does not end a sentence (compared lowercased, without the final period).
ABBREVIATIONS: frozenset[str] = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf fig figs approx dept est inc ltd co corp jan feb mar apr jun "
    "jul aug sep sept oct nov dec mt ft al eq eqs sec ch vol pp".split()
)

# A run of terminators, then optional closing quotes/brackets, then whitespace or the end of the text; or a
# full-width terminator (CJK text puts no space after it); or a newline.
_TERMINATOR = re.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s|$)|[。！？]+[」』”’）]*|\n")
_LIST_NUMBER = re.compile(r"[ \t]*\(?\d{1,3}")
_NEXT_CHAR = re.compile(r"\s*(\S)")


@dataclass
class RuleSplitter:
    """Rule-based sentence splitter (no model, no download).

    Args:
        min_chars: a sentence with fewer non-whitespace characters is merged into the previous sentence (into the
            next one when it is the first), e.g. a stray ``"."`` or ``")"``.
        abbreviations: lowercased words (without their final period) that a period does not end.

    Example:
        >>> text = "Dr. Smith paid $3.50. Then he left!\\nDone."
        >>> [text[s:e] for s, e in RuleSplitter().split(text)]
        ['Dr. Smith paid $3.50.', 'Then he left!', 'Done.']
    """

    min_chars: int = 2
    abbreviations: frozenset[str] = ABBREVIATIONS

    def split(self, text: str) -> list[Span]:
        """Sentence spans of ``text`` (see :class:`SentenceSplitter` for the guarantees)."""
        cuts = [m.end() for m in _TERMINATOR.finditer(text) if self._ends_sentence(text, m)]
        return _spans_between(text, [*cuts, len(text)], self.min_chars)

    def _ends_sentence(self, text: str, m: re.Match) -> bool:
        if m.group() == "\n":
            return True
        if m.group().rstrip("\"'”’»)]") != ".":
            return True  # "!", "?", "...", "?!" always end a sentence
        word_start = m.start()
        while word_start > 0 and not text[word_start - 1].isspace():
            word_start -= 1
        word = text[word_start : m.start()].lstrip("\"'“‘«([")
        if word.lower() in self.abbreviations or (len(word) == 1 and word.isupper()):
            return False  # "Dr. Smith", "J. Smith"
        line_start = text.rfind("\n", 0, m.start()) + 1
        if _LIST_NUMBER.fullmatch(text, line_start, m.start()):
            return False  # "1. First item" at the start of a line
        after = _NEXT_CHAR.match(text, m.end())
        # "e.g. the", "approx. two": a period followed by a lowercase word is rarely a sentence end.
        return not (after and after.group(1).islower())


def _spans_between(text: str, cuts: Sequence[int], min_chars: int) -> list[Span]:
    """The trimmed spans between consecutive cut positions (from 0; the last cut is ``len(text)``),
    whitespace-only ones dropped, then those with fewer than ``min_chars`` non-space characters merged into a
    neighbour (the previous one, or the next one for a tiny first span)."""
    merged: list[Span] = []
    pending: Span | None = None  # a tiny first span waiting to be merged into the next one
    for start, cut in zip([0, *cuts], cuts):
        span = _trimmed(text, start, cut)
        if span is None:
            continue
        if pending is not None:
            span, pending = (pending[0], span[1]), None
        if sum(not c.isspace() for c in text[span[0] : span[1]]) >= min_chars:
            merged.append(span)
        elif merged:
            merged[-1] = (merged[-1][0], span[1])
        else:
            pending = span
    if pending is not None:
        merged.append(pending)  # the whole text is one tiny fragment
    return merged


class SaTSplitter:
    """Sentence splitter backed by ``wtpsplit``'s Segment-any-Text (the SRM splitter, docs/methods/reward-models.md).

    The constructor takes an already-built ``wtpsplit.SaT`` (no I/O here); :meth:`from_pretrained` builds one
    from a model that is already on disk and never downloads.

    Args:
        sat: a ``wtpsplit.SaT`` instance (or any object with ``split(text, threshold=...) -> list[str]`` whose
            pieces concatenate back to the text).
        threshold: SaT's boundary probability threshold (0.2 in the SRM code).
        min_text_chars: texts of at most this many characters are not split (10 in the SRM code).
        min_chars: see :class:`RuleSplitter`.
    """

    def __init__(self, sat: Any, *, threshold: float = 0.2, min_text_chars: int = 10, min_chars: int = 2):
        self.sat, self.threshold, self.min_text_chars, self.min_chars = sat, threshold, min_text_chars, min_chars

    @classmethod
    def from_pretrained(cls, model: str = "sat-3l", **kwargs: Any) -> SaTSplitter:
        """Load SaT from a local directory or the local Hugging Face cache (``segment-any-text/<model>``).

        Args:
            model: a directory holding the SaT model, or a SaT model name already in the Hugging Face cache.
            **kwargs: passed to :class:`SaTSplitter`.

        Returns:
            A ready splitter.

        Raises:
            ConfigError: ``wtpsplit`` is not installed, or the model is not on disk.
        """
        try:
            from wtpsplit import SaT
        except ImportError as err:
            raise ConfigError(
                "SaTSplitter needs the optional package wtpsplit: pip install 'finegrain[sat]' "
                "(or use the default RuleSplitter)"
            ) from err
        path = model
        if not os.path.isdir(model):
            from huggingface_hub import snapshot_download

            repo = model if "/" in model else f"segment-any-text/{model}"
            try:
                path = snapshot_download(repo, local_files_only=True)
            except Exception as err:  # LocalEntryNotFoundError and friends: the model is not cached
                raise ConfigError(
                    f"SaT model {repo!r} is not on disk and finegrain does not download it here; fetch it once "
                    f"with `huggingface-cli download {repo}` or pass a local directory"
                ) from err
        return cls(SaT(path), **kwargs)

    def split(self, text: str) -> list[Span]:
        """Sentence spans of ``text`` (see :class:`SentenceSplitter` for the guarantees)."""
        if len(text) <= self.min_text_chars:  # one (trimmed) span
            return _spans_between(text, [len(text)], self.min_chars)
        pieces = self.sat.split(text, threshold=self.threshold)
        if "".join(pieces) != text:
            raise DataError("SaT returned pieces that do not concatenate back to the text", field="response")
        return _spans_between(text, list(itertools.accumulate(map(len, pieces))), self.min_chars)


def token_sentence_ids(spans: Sequence[Span], offsets: Any) -> list[int]:
    """The sentence of every token: the first span its characters overlap, -1 if none.

    A token ``[s, e)`` overlaps span ``[a, b)`` when ``s < b and a < e``. Whitespace-only tokens between sentences
    and empty tokens (``s == e``) get -1. A token that straddles two sentences belongs to the first.

    Args:
        spans: ``S`` sorted, disjoint sentence spans (from a :class:`SentenceSplitter`).
        offsets: ``(n, 2)`` character offsets of the ``n`` response tokens.

    Returns:
        ``n`` ints in ``[-1, S)``, non-decreasing over the tokens that have a sentence.

    Example:
        >>> token_sentence_ids([(0, 3), (4, 8)], [(0, 2), (2, 3), (3, 4), (4, 8)])
        [0, 0, -1, 1]
    """
    arr = as_offsets(offsets, field="offsets")
    if len(spans) == 0:
        return [-1] * len(arr)
    span_arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    # The first span whose end lies after the token's start is the only candidate (spans are sorted, disjoint).
    j = np.searchsorted(span_arr[:, 1], arr[:, 0], side="right")
    jc = np.minimum(j, len(span_arr) - 1)
    hit = (j < len(span_arr)) & (span_arr[jc, 0] < arr[:, 1]) & (arr[:, 0] < arr[:, 1])
    return np.where(hit, jc, -1).tolist()


def sentence_token_ends(spans: Sequence[Span], offsets: Any) -> list[int]:
    """Index of the last token of every sentence, by :func:`token_sentence_ids`; -1 for a sentence with no token.

    A sentence has no token of its own only when it lies inside a token shared with the previous sentence (or
    when the offsets do not reach it); drop its -1 before building SRM boundaries.

    Args:
        spans: ``S`` sentence spans.
        offsets: ``(n, 2)`` token offsets.

    Returns:
        ``S`` ints in ``[-1, n)``, strictly increasing over the sentences that have tokens.

    Example:
        >>> sentence_token_ends([(0, 3), (4, 8)], [(0, 2), (2, 3), (3, 4), (4, 8)])
        [1, 3]
    """
    ids = np.asarray(token_sentence_ids(spans, offsets), dtype=np.int64)
    ends = np.full(len(spans), -1, dtype=np.int64)
    has = ids >= 0
    # Assigning in token order leaves the largest token index per sentence.
    ends[ids[has]] = np.flatnonzero(has)
    return ends.tolist()


@dataclass
class SentenceBoundaries:
    """Token ids and SRM boundary positions of one (prompt, response) row.

    Fields:
        prompt_ids: prompt token ids; the boundary ``e_0`` is always the last of them (with ``<END>`` inserted,
            that last token is the ``<END>``), i.e. column ``P - 1`` of a left-padded prompt block.
        response_ids: response token ids (with ``<END>`` tokens inserted in mode (a)).
        response_boundaries: ``N`` indices into ``response_ids`` of the boundaries ``e_1 .. e_N``, increasing.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_boundaries: list[int]


def _check_ends(sentence_ends: Sequence[int], n_tokens: int, prompt_ids: Sequence[int]) -> list[int]:
    if len(prompt_ids) == 0:
        raise DataError("SRM needs at least one prompt token for the boundary e_0", field="prompt")
    ends = [int(e) for e in sentence_ends]
    if any(e < 0 or e >= n_tokens for e in ends):
        raise DataError(
            f"sentence ends {ends} must index the {n_tokens} response tokens (drop the -1 of sentences without "
            "tokens first)",
            field="response",
        )
    if any(b <= a for a, b in zip(ends, ends[1:])):
        raise DataError(f"sentence ends {ends} must be strictly increasing", field="response")
    return ends


def insert_end_tokens(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    sentence_ends: Sequence[int],
    end_token_id: int,
    eos_token_id: int | None = None,
) -> SentenceBoundaries:
    """SRM boundary mode (a): insert an ``<END>`` token after the prompt and after every sentence.

    Layout: ``prompt <END> s_1 <END> s_2 <END> … s_N [EOS] <END>``: the ``<END>`` of the last sentence is
    appended at the very end of the response, i.e. after EOS when the response ends with one (and after any
    trailing tokens that belong to no sentence). With no sentence, only the prompt ``<END>`` is inserted. This is
    the layout of SRM's training code (docs/methods/reward-models.md).

    Args:
        prompt_ids: ``P`` prompt token ids (at least one).
        response_ids: ``T`` response token ids, possibly ending with EOS.
        sentence_ends: ``N`` strictly increasing indices of the last token of each sentence
            (from :func:`sentence_token_ends`, without -1 entries).
        end_token_id: the id of the ``<END>`` token (added to the vocabulary by the caller).
        eos_token_id: the EOS id; only used to check that no sentence ends on EOS.

    Returns:
        :class:`SentenceBoundaries` with ``P + 1`` prompt ids, ``T + N`` response ids and ``N`` boundaries.

    Example:
        >>> b = insert_end_tokens([5, 6], [10, 11, 12, 2], [0, 2], end_token_id=99, eos_token_id=2)
        >>> b.prompt_ids, b.response_ids, b.response_boundaries
        ([5, 6, 99], [10, 99, 11, 12, 2, 99], [1, 5])
    """
    ends = _check_ends(sentence_ends, len(response_ids), prompt_ids)
    if eos_token_id is not None and any(response_ids[e] == eos_token_id for e in ends):
        raise DataError("a sentence ends on the EOS token; EOS has no text and belongs to no sentence", field="response")
    out, boundaries, start = [], [], 0
    # the last sentence's <END> goes after everything that follows it (EOS, tokens of no sentence)
    for cut in ([e + 1 for e in ends[:-1]] + [len(response_ids)]) if ends else []:
        out.extend(response_ids[start:cut])
        boundaries.append(len(out))
        out.append(end_token_id)
        start = cut
    out.extend(response_ids[start:])  # everything when there is no sentence
    return SentenceBoundaries([*prompt_ids, end_token_id], out, boundaries)


def mark_sentence_ends(
    prompt_ids: Sequence[int], response_ids: Sequence[int], sentence_ends: Sequence[int]
) -> SentenceBoundaries:
    """SRM boundary mode (b): no new tokens; ``e_0`` = last prompt token, ``e_j`` = last token of sentence j.

    Args:
        prompt_ids: ``P`` prompt token ids (at least one).
        response_ids: ``T`` response token ids.
        sentence_ends: ``N`` strictly increasing indices of the last token of each sentence.

    Returns:
        :class:`SentenceBoundaries` with the ids unchanged and ``response_boundaries == sentence_ends``.

    Example:
        >>> mark_sentence_ends([5, 6], [10, 11, 12, 2], [0, 2]).response_boundaries
        [0, 2]
    """
    ends = _check_ends(sentence_ends, len(response_ids), prompt_ids)
    return SentenceBoundaries(list(prompt_ids), list(response_ids), ends)


# ------------------------------------------------------------------------------------------ recorded splitters


@dataclass
class PunctuationSplitter:
    """Cut after every run of sentence terminators followed by whitespace (or the end), and at newlines.

    Unlike :class:`~finegrain.data.segmentation.RuleSplitter` it has no abbreviation or case rules, so lowercase
    text such as the built-in world's ("it is hot . it shines .") is cut at every period (the rule splitter reads a
    period before a lowercase word as a sentence going on). Spans follow the
    :class:`~finegrain.data.segmentation.SentenceSplitter` guarantees; a piece with fewer than ``min_chars``
    non-space characters joins the previous sentence (the next one when it is first).

    Example:
        >>> t = "it is hot . it shines ."
        >>> [t[a:b] for a, b in PunctuationSplitter().split(t)]
        ['it is hot .', 'it shines .']
    """

    min_chars: int = 2

    def split(self, text: str) -> list[tuple[int, int]]:
        cuts = [m.end() for m in _TERMINATOR.finditer(text)]
        return _spans_between(text, [*cuts, len(text)], self.min_chars)


def make_splitter(config: dict[str, Any] | None = None) -> SentenceSplitter:
    """A sentence splitter from its recorded config: ``{"name": "rule", "min_chars": 2}`` (default),
    ``{"name": "punct", "min_chars": 2}`` (:class:`PunctuationSplitter`) or
    ``{"name": "sat", "model": "sat-3l", "threshold": 0.2}`` (needs ``wtpsplit`` and the model on disk).

    Raises:
        ConfigError: an unknown splitter name or bad settings.
    """
    config = dict(config or {"name": "rule"})
    name = config.pop("name", "rule")
    try:
        if name == "rule":
            return RuleSplitter(**config)
        if name == "punct":
            return PunctuationSplitter(**config)
        if name == "sat":
            model = config.pop("model", "sat-3l")
            splitter = SaTSplitter.from_pretrained(model, **config)
            splitter.model_name = model  # recorded by splitter_config
            return splitter
    except TypeError as err:
        raise ConfigError(f"splitter {name!r}: bad settings {config}: {err}") from None
    raise ConfigError(f"unknown sentence splitter {name!r}; choose 'rule', 'punct' or 'sat'")


def splitter_config(splitter: SentenceSplitter) -> dict[str, Any]:
    """The config :func:`make_splitter` rebuilds ``splitter`` from (rule and SaT splitters)."""
    if isinstance(splitter, RuleSplitter):
        return {"name": "rule", "min_chars": splitter.min_chars}
    if isinstance(splitter, PunctuationSplitter):
        return {"name": "punct", "min_chars": splitter.min_chars}
    if isinstance(splitter, SaTSplitter):
        model = getattr(splitter, "model_name", "sat-3l")
        return {"name": "sat", "model": model, "threshold": splitter.threshold,
                "min_text_chars": splitter.min_text_chars, "min_chars": splitter.min_chars}
    raise ConfigError(f"cannot record a {type(splitter).__name__} splitter; use RuleSplitter, PunctuationSplitter "
                      "or SaTSplitter")
