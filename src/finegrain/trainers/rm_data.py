"""The data of ``finegrain rm``: pairs, revisions (with edit labels computed on the fly) and token rows tokenized
for a reward model, the token-credit ground truth of its evaluation, and scoring that truth with a reward source.

Split from :mod:`finegrain.trainers.rm` (the loop); the row formats are in docs/methods/reward-models.md and
docs/methods/token-rm.md.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from finegrain.errors import DataError
from finegrain.trainers.loop import token_limits

if TYPE_CHECKING:
    from finegrain.trainers.rm_config import RMConfig

__all__ = ["credit_items", "pair_examples", "prepare_sentences", "revision_examples", "score_credit", "token_examples"]

logger = logging.getLogger("finegrain.trainers.rm")


def _blank_chosen_as_missing(rows, *, keep_identical: bool = False):
    """Revision rows: an empty ``chosen`` counts as missing (it is optional per row), so the pair is kept.

    With ``keep_identical``, a row with an explicit prompt whose ``revised`` equals its ``rejected`` (a revision
    that changed nothing, which the row validator refuses) is validated with a stand-in revision instead; its
    ``(file, row)`` is returned so the caller can put the rejected response back as the revision.

    Returns:
        ``(rows, identical)``: the cleaned :class:`~finegrain.data.loading.Rows` and a set of ``(file, row)``.
    """
    identical: set[tuple[str, int]] = set()

    def clean(r: dict, origin: tuple[str, int]) -> dict:
        c = r.get("chosen")
        if isinstance(c, str) and not c.strip():
            r = {**r, "chosen": None}
        rej = r.get("rejected")
        if keep_identical and r.get("prompt") is not None and rej is not None and r.get("revised") == rej:
            identical.add(origin)
            r = {**r, "revised": "x" if rej != "x" else "y"}  # any other valid response; replaced after validation
        return r

    return rows.map(clean), identical


def pair_examples(source: Any, tokenizer, cfg: RMConfig, *, split: str, limit: int | None, skip: bool) -> list[dict]:
    """Tokenized preference pairs (``prompt_input_ids``, ``chosen_*``, ``rejected_*``, ``subset``...)."""
    from finegrain.data.prepared import PreferenceData

    data = PreferenceData.from_source(source, tokenizer, split=split, kind="preference", limits=token_limits(cfg),
                                      skip_invalid=skip, max_examples=limit)
    return list(data.examples)


def revision_examples(source: Any, tokenizer, cfg: RMConfig, *, split: str, limit: int | None,
                      skip: bool) -> list[dict]:
    """Tokenized revision rows with edit labels ``rejected_labels`` (−1/0) and ``revised_labels`` (0/+1) per token.

    Labels come from :func:`finegrain.data.alignment.edit_token_labels` on the tokens' offsets; EOS gets
    :data:`~finegrain.data.tokenize.IGNORE_INDEX`. Pairs whose alignment finds no edit (a revision identical to
    the rejected response included, when the row has an explicit prompt) are kept with every token neutral (label
    0: TLCR's soft target (½, ½), as the official code trains them) when ``cfg.keeps_no_edit_pairs``
    (``no_edit_pairs``: keep, or auto for the discriminator); otherwise they are dropped (identical texts are then
    invalid rows, refused or skipped with ``skip``). Either way they are counted in the log.
    """
    from finegrain.data.alignment import edit_token_labels
    from finegrain.data.loading import load_rows
    from finegrain.data.schema import validate_rows
    from finegrain.data.tokenize import IGNORE_INDEX, tokenize_rows

    rows = load_rows(source, split)
    if limit is not None:
        rows = rows.head(limit)
    skipped: Counter = Counter()
    keep = cfg.keeps_no_edit_pairs
    cleaned, unchanged = _blank_chosen_as_missing(rows, keep_identical=keep)
    valid = validate_rows(cleaned, "revision", skip_invalid=skip, skipped=skipped)
    for item in valid:  # revisions that changed nothing: the rejected response is its own revision
        if (item["source"], item["row"]) in unchanged:
            item["revised"] = item["rejected"]
    examples = tokenize_rows(valid, tokenizer, "revision", token_limits(cfg), skip_invalid=skip, skipped=skipped)
    out, identical = [], 0
    for ex in examples:
        n_rej, n_rev = _text_tokens(ex, "rejected"), _text_tokens(ex, "revised")
        lab = edit_token_labels(ex["rejected_text"], ex["revised_text"], ex["rejected_offsets"][:n_rej],
                                ex["revised_offsets"][:n_rev], unit=cfg.label_unit,
                                rejected_ids=ex["rejected_input_ids"][:n_rej], revised_ids=ex["revised_input_ids"][:n_rev])
        if lab.identical:
            identical += 1
            if not keep:
                continue
        pad = [IGNORE_INDEX]
        ex["rejected_labels"] = lab.rejected_labels + pad * (len(ex["rejected_input_ids"]) - n_rej)
        ex["revised_labels"] = lab.revised_labels + pad * (len(ex["revised_input_ids"]) - n_rev)
        out.append(ex)
    if identical and keep:
        logger.warning("%s: %d revisions without any edit kept, every token neutral (no_edit_pairs)", rows.source,
                       identical)
    elif identical:
        logger.warning("%s: %d revisions without any edit left out (no token signal; no_edit_pairs)", rows.source,
                       identical)
    if not out:
        raise DataError("no revision with an edit left to train on", source=rows.source)
    return out


def _text_tokens(ex: dict, field: str) -> int:
    """Tokens of the text itself: all but an appended EOS (empty offsets at the end of the text)."""
    ids, offs, text = ex[f"{field}_input_ids"], ex[f"{field}_offsets"], ex[f"{field}_text"]
    if ids and tuple(offs[-1]) == (len(text), len(text)):
        return len(ids) - 1
    return len(ids)


def token_examples(source: Any, tokenizer, cfg: RMConfig, *, split: str, limit: int | None, skip: bool) -> list[dict]:
    """Tokenized token-supervision rows (``completion_input_ids``, ``token_labels`` with −100 on unlabelled tokens)."""
    from finegrain.data.prepared import CompletionData

    data = CompletionData.from_source(source, tokenizer, split=split, kind="token", limits=token_limits(cfg),
                                      skip_invalid=skip, max_examples=limit)
    for ex in data.examples:
        bad = [v for v in ex["token_labels"] if v not in (-1, 0, 1, -100)]
        if bad:
            raise DataError(f"token labels must be -1, 0 or +1 for reward models, got {bad[0]!r}", source=ex["source"],
                            row=ex["row"], field="labels")
    return list(data.examples)


def credit_items(source: Any, tokenizer, cfg: RMConfig, *, limit: int | None, skip: bool) -> list[dict]:
    """Ground-truth token credit, one item per response: ``prompt_input_ids``, ``completion_input_ids``,
    ``offsets`` and either ``credit`` per word with the words' ``spans`` (world credit rows) or ``credit`` per token
    (token rows: their labels; revision rows: edit labels, one item per side)."""
    from finegrain.data.loading import load_rows
    from finegrain.data.tokenize import tokenize_prompt, tokenize_response

    rows = load_rows(source)
    if limit is not None and len(rows) > limit:
        logger.warning("%s: the token-credit AUROC uses the first %d of its %d rows (--max_credit_samples %d)",
                       rows.source, limit, len(rows), limit)
        rows = rows.head(limit)
    cols = set(rows.column_names)
    items = []
    if {"prompt", "response", "words", "credit"} <= cols:
        for i, r in enumerate(rows):
            text, words, credit = r["response"], r["words"], r["credit"]
            spans, pos = [], 0
            for w in words:
                start = text.find(w, pos)
                if start < 0 or len(words) != len(credit):
                    raise DataError("words and credit must list the response's words in order", source=rows.source,
                                    row=i, field="words")
                spans.append((start, start + len(w)))
                pos = start + len(w)
            ids, offs, _ = tokenize_response(tokenizer, text)
            prompt = tokenize_prompt(tokenizer, r["prompt"])
            keep = max(1, cfg.max_length - len(prompt))
            items.append({"prompt_input_ids": prompt, "completion_input_ids": ids[:keep], "offsets": offs[:keep],
                          "credit": [float(c) for c in credit], "spans": spans})
        return items
    if {"rejected", "revised"} <= cols:  # one item per side: (example, side, its labels' column)
        examples = revision_examples(source, tokenizer, cfg, split=None, limit=limit, skip=skip)
        sides = [(ex, side, f"{side}_labels") for ex in examples for side in ("rejected", "revised")]
    else:
        examples = token_examples(source, tokenizer, cfg, split=None, limit=limit, skip=skip)
        sides = [(ex, "completion", "token_labels") for ex in examples]
    return [{"prompt_input_ids": ex["prompt_input_ids"], "completion_input_ids": ex[f"{side}_input_ids"],
             "offsets": ex[f"{side}_offsets"], "credit": [0.0 if v == -100 else float(v) for v in ex[labels]]}
            for ex, side, labels in sides]


def score_credit(source, items: list[dict], pad_token_id: int, *, reduce: str = "sum",
                 batch_size: int = 16) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Run a reward source on credit items; return per-item scores and credit in the same units (words or tokens).

    Token rewards are mapped onto words through character offsets (:func:`finegrain.rewards.models.map_token_values`
    with ``reduce``) when the credit is per word; tokens with an empty span (EOS) belong to no word and are left out.
    """
    from finegrain.data.collate import collate_completions
    from finegrain.rewards.models import map_token_values

    scores, credit = [], []
    for lo in range(0, len(items), batch_size):
        part = items[lo : lo + batch_size]
        batch = collate_completions([{"prompt_input_ids": it["prompt_input_ids"],
                                      "completion_input_ids": it["completion_input_ids"]} for it in part], pad_token_id)
        values = source.token_rewards(batch).values.double().cpu().numpy()
        for it, v in zip(part, values):
            n = len(it["completion_input_ids"])
            if "spans" in it:
                text_tokens = [k for k, (a, b) in enumerate(it["offsets"][:n]) if b > a]
                s = map_token_values(v[:n][text_tokens], [it["offsets"][k] for k in text_tokens], it["spans"],
                                     reduce=reduce)
            else:
                s = v[:n]
            scores.append(s)
            credit.append(np.asarray(it["credit"][: len(s)], dtype=np.float64))
    return scores, credit


def prepare_sentences(model, examples: list[dict], fields: tuple[str, ...]) -> None:
    """Add the sentence RM's prepared rows (``{field}_srm``) to tokenized examples, in place."""
    for ex in examples:
        for f in fields:
            ex[f"{f}_srm"] = model.prepare(ex["prompt_input_ids"], ex[f"{f}_input_ids"], ex[f"{f}_text"],
                                           ex[f"{f}_offsets"])
