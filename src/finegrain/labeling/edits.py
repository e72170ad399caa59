"""``finegrain label edits``: token labels from minimal-edit revisions (TLCR, token RM; docs/labeling.md).

Reads revision rows ``{prompt, rejected, revised[, chosen]}`` (the output of ``finegrain label revise``, or the
built-in world's ``data/revisions.jsonl``), aligns each rejected response with its revision
(:func:`finegrain.data.alignment.label_revisions`) and writes **token supervision rows**, two per pair, that
:class:`finegrain.data.CompletionData` and ``finegrain rm --level discriminator|token`` load as they are (labels as
in :data:`DESCRIPTION`). Their two formats (``labels`` for one tokenizer's tokens, or character ``spans`` any
tokenizer can read), ``side``, ``pair`` and the pairs left out: docs/labeling.md, "finegrain label edits".
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from finegrain.config import check_ranges, option
from finegrain.errors import ConfigError

__all__ = ["EditsConfig", "EditsSummary", "label_rows", "run_edits", "spans_from_labels"]

logger = logging.getLogger(__name__)

DESCRIPTION = """Token labels from {prompt, rejected, revised} rows by edit alignment (TLCR, minimal-edit token RM).

Writes JSON Lines of token supervision rows {prompt, response, labels | spans, side, pair}, two per pair: -1 on
rejected tokens that the revision deleted or substituted, +1 on revision tokens it added or substituted, 0 on
unchanged tokens. With no data set, labels the built-in world's revisions with the world's tokenizer.

examples:
  finegrain label edits --output_file world_edits.jsonl
  finegrain label edits --dataset_name revisions.jsonl --tokenizer_name_or_path Qwen/Qwen2.5-0.5B \\
      --output_file edits.jsonl
  finegrain label edits --dataset_name revisions.jsonl --format spans --output_file edit_spans.jsonl
"""


@dataclasses.dataclass
class EditsConfig:
    """Token labels from revisions by token-level edit alignment."""

    output_file: str = option(help="JSONL file of token supervision rows to write")
    dataset_name: str | None = option(None, "hub id, local file or directory of revision rows (prompt, rejected, "
                                      "revised, optionally chosen); default: the built-in world's revisions")
    dataset_split: str = option("train", "split of dataset_name")
    tokenizer_name_or_path: str | None = option(None, "the tokenizer whose tokens get the labels (a fast tokenizer); "
                                                "default: the world's tokenizer when no data set is given")
    trust_remote_code: bool = option(False, "allow a tokenizer with custom code from the hub")
    unit: Literal["word", "token", "char"] = option("word", "alignment unit: word (words and punctuation; a changed "
                                                    "word marks all its tokens), token (the tokens themselves, as the "
                                                    "TLCR code), char")
    format: Literal["labels", "spans"] = option("labels", "labels: one integer per token of this tokenizer; spans: "
                                                "character spans that any tokenizer can read")
    sides: Literal["both", "rejected", "revised"] = option("both", "which responses of each pair to write")
    keep_identical: bool = option(False, "also write pairs whose alignment finds no edit (all labels 0)")
    limit: int | None = option(None, "use only the first N input rows")
    skip_invalid_rows: bool = option(False, "skip bad input rows (counted and logged) instead of stopping")
    overwrite_output: bool = option(False, "replace output_file if it exists")

    def __post_init__(self) -> None:
        check_ranges(self, positive=("limit",))
        if self.dataset_name is not None and self.tokenizer_name_or_path is None:
            raise ConfigError("--dataset_name needs --tokenizer_name_or_path: labels belong to one tokenizer's tokens "
                              "(or use --format spans --unit word for tokenizer-free labels, still with a tokenizer "
                              "to find the words' spans)")


@dataclasses.dataclass
class EditsSummary:
    """What :func:`run_edits` did."""

    pairs: int = 0
    written_rows: int = 0
    identical: int = 0
    skipped: int = 0
    negative_tokens: int = 0
    positive_tokens: int = 0
    neutral_tokens: int = 0
    output_file: str = ""

    def __str__(self) -> str:
        left = f", {self.identical} without any edit (left out)" if self.identical else ""
        skipped = f", {self.skipped} invalid rows skipped" if self.skipped else ""
        return (f"{self.pairs} pairs labelled -> {self.written_rows} rows{left}{skipped}; tokens: "
                f"{self.negative_tokens} negative, {self.positive_tokens} positive, {self.neutral_tokens} neutral "
                f"-> {self.output_file}")


def spans_from_labels(labels: list[int], offsets: list[tuple[int, int]]) -> list[dict[str, int]]:
    """Character spans of runs of equally labelled tokens: ``[{"start", "end", "label"}]``, sorted, disjoint.

    Tokens with empty offsets are skipped; a run covers ``[start of its first token, end of its last)``.

    Example:
        >>> spans_from_labels([0, -1, -1, 0], [(0, 2), (3, 5), (6, 9), (10, 11)])
        [{'start': 0, 'end': 2, 'label': 0}, {'start': 3, 'end': 9, 'label': -1}, {'start': 10, 'end': 11, 'label': 0}]
    """
    spans: list[dict[str, int]] = []
    for label, (s, e) in zip(labels, offsets):
        if s >= e:
            continue
        if spans and spans[-1]["label"] == label:
            spans[-1]["end"] = e
        else:
            spans.append({"start": s, "end": e, "label": int(label)})
    return spans


def label_rows(rows: list[dict], tokenizer: Any, *, unit: str = "word", fmt: str = "labels", sides: str = "both",
               keep_identical: bool = False, summary: EditsSummary | None = None) -> list[dict]:
    """Token supervision rows from validated revision rows (see the module docstring).

    Args:
        rows: normalised revision rows (:func:`finegrain.data.schema.validate_rows` with kind ``revision``).
        tokenizer: a Hugging Face fast tokenizer.
        unit: the alignment unit (``word``, ``token``, ``char``).
        fmt: ``labels`` or ``spans``.
        sides: ``both``, ``rejected`` or ``revised``.
        keep_identical: keep pairs without any edit.
        summary: counts are added to it when given.

    Returns:
        Output rows, two per kept pair (one with ``sides`` other than ``both``).
    """
    from finegrain.data.alignment import label_revisions

    summary = summary if summary is not None else EditsSummary()
    if not rows:
        return []
    labelled = label_revisions(tokenizer, [r["rejected"] for r in rows], [r["revised"] for r in rows], unit=unit)
    out = []
    for r, lab in zip(rows, labelled):
        if lab.identical and not keep_identical:
            summary.identical += 1
            continue
        summary.pairs += 1
        pair = r["row"] if r.get("row") is not None else len(out)
        for side, text, labels, offsets in (("rejected", r["rejected"], lab.rejected_labels, lab.rejected_offsets),
                                            ("revised", r["revised"], lab.revised_labels, lab.revised_offsets)):
            if sides not in ("both", side):
                continue
            value = [int(x) for x in labels] if fmt == "labels" else spans_from_labels(labels, offsets)
            out.append({"prompt": r["prompt"], "response": text, "labels" if fmt == "labels" else "spans": value,
                        "side": side, "pair": pair})
            counts = Counter(labels)
            summary.negative_tokens += counts[-1]
            summary.positive_tokens += counts[1]
            summary.neutral_tokens += counts[0]
    summary.written_rows += len(out)
    return out


def run_edits(cfg: EditsConfig) -> EditsSummary:
    """Label the revisions of ``cfg`` and write ``cfg.output_file`` (atomically: a reader never sees half of it).

    Returns:
        The :class:`EditsSummary`.

    Raises:
        ConfigError: the output exists (without ``overwrite_output``), or a tokenizer without offsets.
        DataError: a bad input row (unless ``skip_invalid_rows``).
    """
    from finegrain.data.files import write_jsonl
    from finegrain.data.loading import Rows, load_rows
    from finegrain.data.schema import validate_rows
    from finegrain.models.loading import load_tokenizer

    out_path = Path(cfg.output_file)
    if out_path.exists() and not cfg.overwrite_output:
        raise ConfigError(f"{out_path} exists; pass --overwrite_output to replace it or choose another --output_file")
    if cfg.dataset_name is None or cfg.tokenizer_name_or_path is None:
        raise ConfigError("label edits needs --dataset_name (revision rows) and --tokenizer_name_or_path; with neither, "
                          "it labels the built-in world's revisions")
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path, trust_remote_code=cfg.trust_remote_code)
    rows = load_rows(cfg.dataset_name, cfg.dataset_split)
    if cfg.limit is not None:
        rows = rows.head(cfg.limit)
    # The chosen response plays no part in edit labels: drop it, so that a bad or empty one is not an error.
    rows = Rows([(name, [{k: v for k, v in r.items() if k != "chosen"} for r in data]) for name, data in rows.parts],
                rows.source)
    skipped: Counter = Counter()
    valid = validate_rows(rows, "revision", skip_invalid=cfg.skip_invalid_rows, skipped=skipped)
    summary = EditsSummary(skipped=sum(skipped.values()), output_file=str(out_path))
    out = label_rows(valid, tokenizer, unit=cfg.unit, fmt=cfg.format, sides=cfg.sides,
                     keep_identical=cfg.keep_identical, summary=summary)
    write_jsonl(out_path, out)
    return summary
