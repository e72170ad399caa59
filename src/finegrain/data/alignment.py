"""Token labels from minimal edits: align a rejected response with its revision, label the policy's tokens.

Used by TLCR (Yoon et al., Findings ACL 2024, arXiv 2407.16574; docs/methods/tlcr.md) and the minimal-edit token
reward model (Xu et al., ACL 2024, arXiv 2406.02756; docs/methods/token-rm.md). An annotator rewrites the rejected
response ``y_l`` into ``y_e`` with as few changes as possible; a unit-cost Levenshtein alignment between the two
then says which parts changed:

* every unit of the rejected response is tagged ``U`` (unchanged), ``S`` (substituted) or ``D`` (deleted);
* every unit of the revision is tagged ``U``, ``S`` or ``A`` (added);
* labels: a rejected unit is **-1** if ``S`` or ``D``, else 0; a revised unit is **+1** if ``S`` or ``A``, else 0.

The alignment itself is ``rapidfuzz.distance.Levenshtein.editops`` (a bit-parallel C++ implementation that
accepts any sequence of hashables), not a hand-written DP.

Labels reach the *policy's* tokens through character offsets, never by re-tokenising (the official TLCR code
labels the response tokenised alone and writes the labels into the full sequence at the prompt length, which can
be off by one token; docs/methods/tlcr.md): the two texts are cut into alignment units, changed units become
character spans, and each policy token, given by its ``(start, end)`` offsets within the response text, takes the
label if it overlaps a changed span by at least one character (:func:`finegrain.data.tokenize.spans_to_labels`).
The alignment unit (``unit=``) is ``"word"`` (default; :func:`unit_spans`), ``"token"`` (the policy tokens, the
official code's choice) or ``"char"``; their effects are tabled in docs/labeling.md ("How the labels are made").
Tokens with an empty offset span are always neutral; when the alignment finds no edit, :attr:`EditLabels.identical`
is True (the pair has no signal).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from rapidfuzz.distance import Levenshtein

from finegrain.data.tokenize import spans_to_labels
from finegrain.errors import ConfigError, DataError

Unit = Literal["word", "token", "char"]
UNITS: tuple[str, ...] = ("word", "token", "char")

_WORD = re.compile(r"\w+|[^\w\s]")


def edit_tags(source: Sequence[Hashable], target: Sequence[Hashable]) -> tuple[list[str], list[str]]:
    """Per-element edit tags of a minimal unit-cost Levenshtein alignment of ``source`` into ``target``.

    Several minimal edit scripts can exist; this returns the one rapidfuzz's back-trace picks. The number of
    non-``U`` tags, ``#S + #D + #A`` (S counted once per pair), equals the Levenshtein distance.

    Args:
        source: length-``n`` sequence of hashables (token ids, words, characters), the rejected response.
        target: length-``m`` sequence of hashables, the revision.

    Returns:
        ``(source_tags, target_tags)``: lists of length ``n`` over ``{"U", "S", "D"}`` and of length ``m`` over
        ``{"U", "S", "A"}``.

    Example:
        >>> edit_tags(["the", "cat", "sat"], ["the", "dog", "sat", "down"])
        (['U', 'S', 'U'], ['U', 'S', 'U', 'A'])
    """
    source_tags = ["U"] * len(source)
    target_tags = ["U"] * len(target)
    for op in Levenshtein.editops(source, target):
        if op.tag == "replace":
            source_tags[op.src_pos] = "S"
            target_tags[op.dest_pos] = "S"
        elif op.tag == "delete":
            source_tags[op.src_pos] = "D"
        else:  # insert
            target_tags[op.dest_pos] = "A"
    return source_tags, target_tags


def tag_labels(source_tags: Sequence[str], target_tags: Sequence[str]) -> tuple[list[int], list[int]]:
    """TLCR labels from edit tags (docs/methods/tlcr.md, step 1).

    Args:
        source_tags: ``n`` tags of the rejected response over ``{"U", "S", "D"}``.
        target_tags: ``m`` tags of the revision over ``{"U", "S", "A"}``.

    Returns:
        ``(rejected_labels, revised_labels)``: ``n`` ints in ``{-1, 0}`` (-1 on S/D) and ``m`` ints in ``{0, +1}``
        (+1 on S/A).

    Example:
        >>> tag_labels(["U", "S", "D"], ["U", "S", "A"])
        ([0, -1, -1], [0, 1, 1])
    """
    return [-1 if t != "U" else 0 for t in source_tags], [1 if t != "U" else 0 for t in target_tags]


@dataclass
class EditLabels:
    """Per-token labels of one (rejected, revised) pair.

    Fields:
        rejected_labels: one int per rejected-response token, -1 (changed) or 0 (neutral).
        revised_labels: one int per revised-response token, +1 (changed) or 0 (neutral).
        identical: True when the alignment found no edit (all labels 0); the pair carries no token signal.
        distance: the edit distance in alignment units.
    """

    rejected_labels: list[int]
    revised_labels: list[int]
    identical: bool
    distance: int


@dataclass
class RevisionLabels(EditLabels):
    """:class:`EditLabels` plus the tokenization they refer to (from :func:`label_revisions`).

    Fields:
        rejected_input_ids / revised_input_ids: the response token ids, tokenized alone without special tokens.
        rejected_offsets / revised_offsets: ``(start, end)`` character offsets of those tokens in the texts.
    """

    rejected_input_ids: list[int] | None = None
    revised_input_ids: list[int] | None = None
    rejected_offsets: list[tuple[int, int]] | None = None
    revised_offsets: list[tuple[int, int]] | None = None


def as_offsets(offsets: Any, text_length: int | None = None, field: str | None = None) -> np.ndarray:
    """Token offsets as an ``(n, 2)`` int64 array, checked: ``0 <= start <= end`` (``<= text_length`` if given).

    Args:
        offsets: ``n`` ``(start, end)`` pairs (list, array or tensor); ``[]`` for no token.
        text_length: the number of characters of the text the offsets index, or None to skip that bound.
        field: named in the error message.

    Returns:
        ``(n, 2)`` int64 array.

    Raises:
        DataError: not pairs, or a pair out of range.
    """
    arr = np.asarray(offsets, dtype=np.int64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DataError(f"offsets must be (start, end) pairs, got an array of shape {arr.shape}", field=field)
    bad = (arr[:, 0] < 0) | (arr[:, 0] > arr[:, 1])
    if text_length is not None:
        bad |= arr[:, 1] > text_length
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        within = f"outside the text of {text_length} characters " if text_length is not None else ""
        raise DataError(
            f"token {i} has offsets ({arr[i, 0]}, {arr[i, 1]}) {within}(or start > end); offsets must come "
            "from tokenizing this exact text",
            field=field,
        )
    return arr


def unit_spans(text: str, unit: Literal["word", "char"]) -> list[tuple[int, int]]:
    """Character spans of the alignment units of ``text``.

    Args:
        text: the response text.
        unit: ``"word"`` (``\\w+`` runs and single punctuation marks) or ``"char"`` (every character).

    Returns:
        ``(start, end)`` spans in text order; whitespace belongs to no word.

    Example:
        >>> unit_spans("Hi, you!", "word")
        [(0, 2), (2, 3), (4, 7), (7, 8)]
    """
    if unit == "word":
        return [m.span() for m in _WORD.finditer(text)]
    if unit == "char":
        return [(i, i + 1) for i in range(len(text))]
    raise ConfigError(f"unit_spans: unit must be 'word' or 'char', got {unit!r}")


def edit_token_labels(
    rejected_text: str,
    revised_text: str,
    rejected_offsets: Any,
    revised_offsets: Any,
    *,
    unit: Unit = "word",
    rejected_ids: Sequence[Hashable] | None = None,
    revised_ids: Sequence[Hashable] | None = None,
) -> EditLabels:
    """TLCR / minimal-edit token labels for the policy tokens of a (rejected, revised) pair (docs/labeling.md).

    Aligns the two texts on ``unit`` (see the module docstring), turns changed units into character spans and
    labels each token by overlap: rejected tokens -1 where they overlap a substituted/deleted unit, revised tokens
    +1 where they overlap a substituted/added unit, 0 elsewhere.

    Args:
        rejected_text: the rejected response ``y_l`` (response only, no prompt).
        revised_text: its minimal revision ``y_e``.
        rejected_offsets: ``(n, 2)`` character offsets of the ``n`` policy tokens of ``rejected_text``.
        revised_offsets: ``(m, 2)`` character offsets of the ``m`` policy tokens of ``revised_text``.
        unit: the alignment unit, ``"word"`` (default), ``"token"`` or ``"char"``.
        rejected_ids: with ``unit="token"``, the ``n`` token ids to align (default: the tokens' text slices).
        revised_ids: with ``unit="token"``, the ``m`` token ids.

    Returns:
        :class:`EditLabels` with ``n`` rejected labels in ``{-1, 0}`` and ``m`` revised labels in ``{0, +1}``.

    Raises:
        DataError: offsets out of range of their text, or ids whose count differs from the offsets'.
        ConfigError: an unknown ``unit``.

    Example:
        >>> edit_token_labels("the cat sat", "the dog sat", [(0, 3), (4, 7), (8, 11)], [(0, 3), (4, 7), (8, 11)])
        EditLabels(rejected_labels=[0, -1, 0], revised_labels=[0, 1, 0], identical=False, distance=1)
    """
    if unit not in UNITS:
        raise ConfigError(f"edit_token_labels: unit must be one of {UNITS}, got {unit!r}")
    rej_off = as_offsets(rejected_offsets, len(rejected_text), "rejected_offsets")
    rev_off = as_offsets(revised_offsets, len(revised_text), "revised_offsets")

    if unit == "token":
        rej_units = _token_units(rejected_text, rej_off, rejected_ids, "rejected_ids")
        rev_units = _token_units(revised_text, rev_off, revised_ids, "revised_ids")
        rej_tags, rev_tags = edit_tags(rej_units, rev_units)
        # The units are the tokens: the tags are the labels, no span projection needed.
        rej_labels, rev_labels = tag_labels(rej_tags, rev_tags)
    else:
        rej_spans = unit_spans(rejected_text, unit)
        rev_spans = unit_spans(revised_text, unit)
        rej_tags, rev_tags = edit_tags(
            [rejected_text[s:e] for s, e in rej_spans], [revised_text[s:e] for s, e in rev_spans]
        )
        # changed units are sorted and disjoint, as spans_to_labels needs: a token overlapping one takes its label
        rej_changed = [(s, e, -1) for (s, e), tag in zip(rej_spans, rej_tags) if tag != "U"]
        rev_changed = [(s, e, 1) for (s, e), tag in zip(rev_spans, rev_tags) if tag != "U"]
        rej_labels = spans_to_labels(rej_off.tolist(), rej_changed, fill=0)
        rev_labels = spans_to_labels(rev_off.tolist(), rev_changed, fill=0)
    # Distance from the tags: every S pairs one source and one target tag, so count it once.
    distance = sum(t != "U" for t in rej_tags) + sum(t == "A" for t in rev_tags)
    return EditLabels(rej_labels, rev_labels, identical=distance == 0, distance=distance)


def _token_units(text: str, offsets: np.ndarray, ids: Sequence[Hashable] | None, field: str) -> list[Hashable]:
    if ids is None:
        return [text[s:e] for s, e in offsets.tolist()]
    if len(ids) != len(offsets):
        raise DataError(f"{len(ids)} token ids but {len(offsets)} offsets", field=field)
    return list(ids)


def label_revisions(
    tokenizer: Any, rejected: Sequence[str], revised: Sequence[str], *, unit: Unit = "word"
) -> list[RevisionLabels]:
    """Tokenize (rejected, revised) response pairs with the policy tokenizer and label their tokens.

    Tokenization policy: each response is tokenized **alone**, with ``add_special_tokens=False`` and
    ``return_offsets_mapping=True`` -- the same way finegrain's batch layout builds the response block (the
    prompt is a separate left-padded block), so ``labels[t]`` belongs to response token ``t`` and an EOS appended
    by the collator is simply unlabelled (0). Both lists are tokenized in one batched call of the fast tokenizer.

    Args:
        tokenizer: a Hugging Face *fast* tokenizer (offsets need one).
        rejected: ``K`` rejected responses.
        revised: ``K`` revisions, ``revised[i]`` of ``rejected[i]``.
        unit: the alignment unit, see :func:`edit_token_labels`.

    Returns:
        ``K`` :class:`RevisionLabels`, each with the token ids and offsets the labels refer to.

    Raises:
        ConfigError: the tokenizer is not a fast tokenizer.
        DataError: the two lists differ in length (``row`` names the first pair that cannot be labelled).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; edit labels need its offset mapping "
            "(load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    if len(rejected) != len(revised):
        raise DataError(f"{len(rejected)} rejected responses but {len(revised)} revisions")
    rejected, revised = list(rejected), list(revised)
    enc_rej = tokenizer(rejected, add_special_tokens=False, return_offsets_mapping=True)
    enc_rev = tokenizer(revised, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for i, (rej_text, rev_text) in enumerate(zip(rejected, revised)):
        rej_ids, rev_ids = enc_rej["input_ids"][i], enc_rev["input_ids"][i]
        rej_off = [tuple(o) for o in enc_rej["offset_mapping"][i]]
        rev_off = [tuple(o) for o in enc_rev["offset_mapping"][i]]
        try:
            labels = edit_token_labels(rej_text, rev_text, rej_off, rev_off, unit=unit, rejected_ids=rej_ids,
                                       revised_ids=rev_ids)
        except DataError as err:
            raise DataError(err.reason, row=i, field=err.field) from err
        out.append(RevisionLabels(**vars(labels), rejected_input_ids=rej_ids, revised_input_ids=rev_ids,
                                  rejected_offsets=rej_off, revised_offsets=rev_off))
    return out

