"""Tokenize validated rows into a prompt and responses, with character offsets and per-token extras.

Rules (the same for every row kind and every Hugging Face fast tokenizer):

* **Prompt.** A conversational prompt goes through the tokenizer's chat template with
  ``add_generation_prompt=True`` and is then tokenized without adding special tokens (the template writes its own,
  e.g. BOS). A tokenizer without a chat template renders messages as ``"{role}: {content}\\n"`` lines followed by
  ``"assistant:"`` (a warning is logged). A string prompt is tokenized *with* special tokens (BOS where the tokenizer
  adds one), as TRL does for standard data. A doubled BOS is reduced to one. Every prompt has at least one token:
  an empty prompt becomes ``[BOS]``; a tokenizer without BOS makes an empty prompt an error.
* **Response.** Each response text is tokenized alone with ``add_special_tokens=False`` and
  ``return_offsets_mapping=True``; the offsets ``(start, end)`` are character positions in that text (they are what
  edit alignment, spans and sentence segmentation use). EOS is appended with offsets ``(len, len)`` unless the
  text already ends with it. For conversational data the response text is the assistant message's content.
* **Per-token extras.** ``labels`` and ``*_token_rewards`` give one value per response token as the user's
  tokenization sees it: either without EOS (EOS then gets label :data:`IGNORE_INDEX`, reward 0) or with it. Any
  other length is an error. ``spans`` become per-token labels through the offsets (:func:`spans_to_labels`).
* **Truncation** (:class:`TokenLimits`). A prompt longer than ``max_prompt_length`` keeps its *end* (cut from the
  left; a leading BOS is kept) when ``truncate_prompt`` is True, the default, as in TRL and the DPO reference code;
  the rows so cut are counted and logged, and marked ``prompt_truncated``. With ``truncate_prompt=False`` such a
  prompt is a :class:`~finegrain.errors.DataError` (or a counted skip). Then each response is cut from the right so
  that prompt + response <= ``max_length`` (and response <= ``max_completion_length``); a cut response loses its EOS
  and is marked ``truncated``. Since ``max_prompt_length < max_length`` every response keeps at least one token.

Output: one dict per row. Every kind has ``prompt`` (the raw prompt), ``prompt_input_ids`` and
``prompt_truncated``, plus ``source`` and ``row``. Each response ``r`` of a two-response row (``chosen``,
``rejected``, ``revised``) adds ``{r}_input_ids``, ``{r}_offsets``, ``{r}_text``, ``{r}_truncated``; a
one-response row (``sft``, ``token``) adds ``completion_input_ids``, ``completion_offsets``, ``completion_text``,
``truncated``; prompt-only rows have empty completion lists. Extras: ``token_labels`` (token rows),
``chosen_token_rewards`` / ``rejected_token_rewards``, ``margin``, ``ref_chosen_logps``, ``ref_rejected_logps``,
``subset`` (preference rows), each only when the data have it.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finegrain.data.schema import log_skips, row_error, skip_key
from finegrain.errors import SKIP_HINT, ConfigError, DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no label (EOS without a given label, tokens outside every span, padding)."""

_RESPONSES: dict[str, tuple[str, ...]] = {
    "preference": ("chosen", "rejected"),
    "revision": ("rejected", "revised", "chosen"),
    "token": ("response",),
    "sft": ("completion",),
    "prompt": (),
}
_ROW_EXTRAS = ("margin", "ref_chosen_logps", "ref_rejected_logps", "subset")
_TRUNCATED = ("truncated", "chosen_truncated", "rejected_truncated", "revised_truncated")


@dataclass(frozen=True)
class TokenLimits:
    """Length limits and the truncation policy (see the module docstring).

    Fields:
        max_length: maximum prompt + response tokens per row; None for no limit.
        max_prompt_length: maximum prompt tokens; None means ``max_length - 1``.
        max_completion_length: maximum response tokens (EOS included); None for no separate limit.
        truncate_prompt: keep the end of an over-long prompt (True) or treat it as a bad row (False).
    """

    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    max_completion_length: int | None = None
    truncate_prompt: bool = True

    def __post_init__(self) -> None:
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.max_length is not None and self.max_prompt_length is not None:
            if self.max_prompt_length >= self.max_length:
                raise ConfigError(
                    f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
                    "so that every response keeps at least one token"
                )

    @property
    def prompt_limit(self) -> int | None:
        """The effective prompt limit: ``max_prompt_length``, else ``max_length - 1``, else None."""
        if self.max_prompt_length is not None:
            return self.max_prompt_length
        return self.max_length - 1 if self.max_length is not None else None


# ------------------------------------------------------------------------------------------------------ pieces


def prompt_text(tokenizer: Any, prompt: str | list[dict]) -> tuple[str, bool]:
    """The text a prompt is tokenized from and whether to add special tokens (see the module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: a string, or a list of ``{"role", "content"}`` messages.

    Returns:
        ``(text, add_special_tokens)``.
    """
    if isinstance(prompt, str):
        return prompt, True
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), False
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:", True


def _finish_prompt(ids: list[int], bos: int | None) -> list[int]:
    if bos is not None:
        if not ids:
            return [bos]
        if len(ids) >= 2 and ids[0] == ids[1] == bos:
            return ids[1:]
    return ids


def tokenize_prompt(tokenizer: Any, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt (untruncated), never empty when the tokenizer has a BOS token."""
    text, special = prompt_text(tokenizer, prompt)
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return _finish_prompt(list(ids), tokenizer.bos_token_id)


def tokenize_response(
    tokenizer: Any, text: str, *, add_eos: bool = True
) -> tuple[list[int], list[tuple[int, int]], int]:
    """Token ids and character offsets of a response tokenized alone, with EOS appended.

    Args:
        tokenizer: a Hugging Face fast tokenizer (offsets need one).
        text: the response text.
        add_eos: append ``eos_token_id`` (offsets ``(len(text), len(text))``) unless the text already ends with it.

    Returns:
        ``(ids, offsets, num_text_tokens)``: ``len(ids) == len(offsets)``; ``num_text_tokens`` counts the tokens of
        the text itself (without an appended EOS).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _with_eos(list(enc["input_ids"]), list(enc["offset_mapping"]), len(text), tokenizer, add_eos)


def _with_eos(ids: list[int], offsets: list, n_chars: int, tokenizer: Any, add_eos: bool):
    n_text = len(ids)
    if add_eos:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no eos_token; set tokenizer.eos_token so responses can end")
        if not ids or ids[-1] != eos:
            ids, offsets = ids + [eos], offsets + [(n_chars, n_chars)]
    return ids, offsets, n_text


def spans_to_labels(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int, Any]], fill: Any = IGNORE_INDEX
) -> list:
    """Per-token labels from labelled character spans.

    A token ``[s, e)`` takes the label of the span it overlaps by the most characters (ties: the earlier span);
    tokens that overlap no span, and empty tokens (``s == e``, e.g. an appended EOS), get ``fill``.

    Args:
        offsets: ``(start, end)`` of each token in the text.
        spans: sorted, non-overlapping ``(start, end, label)`` character spans (as :mod:`finegrain.data.schema`
            gives them).
        fill: the label of uncovered tokens.

    Returns:
        One label per token.

    Example:
        >>> spans_to_labels([(0, 3), (3, 7), (7, 11), (11, 11)], [(0, 5, 1), (8, 11, 0)])
        [1, 1, 0, -100]
    """
    starts = [s for s, _, _ in spans]
    ends = [e for _, e, _ in spans]
    out = []
    for s, e in offsets:
        best, best_overlap = fill, 0
        j = bisect.bisect_right(ends, s)
        while s < e and j < len(spans) and starts[j] < e:
            overlap = min(e, ends[j]) - max(s, starts[j])
            if overlap > best_overlap:
                best, best_overlap = spans[j][2], overlap
            j += 1
        out.append(best)
    return out


# ------------------------------------------------------------------------------------------------------- rows


class _Encoder:
    """Batched tokenizer calls; a text the tokenizer rejects is reported on its own row, not for the whole batch."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str], special: bool, offsets: bool) -> list[Any]:
        if not texts:
            return []
        kwargs = {"add_special_tokens": special, "return_offsets_mapping": offsets}
        try:
            enc = self.tokenizer(texts, **kwargs)
            return [self._pick(enc, i, offsets) for i in range(len(texts))]
        except Exception:  # find the text at fault below
            out: list[Any] = []
            for t in texts:
                try:
                    out.append(self._pick(self.tokenizer([t], **kwargs), 0, offsets))
                except Exception as e:  # tokenizers raise TypeError/ValueError/PanicException on odd input
                    out.append(e)
            return out

    @staticmethod
    def _pick(enc: Mapping, i: int, offsets: bool) -> Any:
        ids = list(enc["input_ids"][i])
        return (ids, list(enc["offset_mapping"][i])) if offsets else ids


class _Tokenized:
    """Tokenization of one row, assembled from batched encodings."""

    def __init__(self, row: dict, kind: str, tokenizer: Any, limits: TokenLimits, add_eos: bool):
        self.row, self.kind, self.tokenizer, self.limits, self.add_eos = row, kind, tokenizer, limits, add_eos
        self.fields = [f for f in _RESPONSES[kind] if row.get(f) is not None]

    def error(self, reason: str, field: str, detail: str = "") -> DataError:
        return row_error(reason, source=self.row.get("source"), row=self.row.get("row"), field=field, detail=detail)

    def build(self, prompt_enc: Any, response_encs: dict[str, Any]) -> dict:
        row, limits, tok = self.row, self.limits, self.tokenizer
        if isinstance(prompt_enc, Exception):
            raise self.error("cannot tokenize", "prompt", f"{type(prompt_enc).__name__}: {prompt_enc}")
        prompt_ids = _finish_prompt(prompt_enc, tok.bos_token_id)
        if not prompt_ids:
            raise self.error("empty prompt", "prompt", "the prompt has no tokens and the tokenizer has no BOS token")
        cut_prompt = limits.prompt_limit is not None and len(prompt_ids) > limits.prompt_limit
        if cut_prompt:
            if not limits.truncate_prompt:
                raise self.error("prompt too long", "prompt", f"{len(prompt_ids)} tokens > max_prompt_length "
                                 f"{limits.prompt_limit} (truncate_prompt is off)")
            prompt_ids = _keep_end(prompt_ids, limits.prompt_limit, tok.bos_token_id)
        out: dict[str, Any] = {"prompt": row["prompt"], "prompt_input_ids": prompt_ids,
                               "prompt_truncated": cut_prompt}
        room = min(math.inf if limits.max_length is None else limits.max_length - len(prompt_ids),
                   limits.max_completion_length or math.inf)
        single = self.kind in ("token", "sft", "prompt")
        for field in self.fields:
            enc = response_encs[field]
            if isinstance(enc, Exception):
                raise self.error("cannot tokenize", field, f"{type(enc).__name__}: {enc}")
            text = row[field]
            ids, offsets, n_text = _with_eos(enc[0], enc[1], len(text), tok, self.add_eos)
            if n_text == 0 and not self.add_eos:
                raise self.error("empty response", field, "the text has no tokens and no EOS is appended")
            extras = self._per_token(field, offsets, n_text, len(ids))
            truncated = len(ids) > room
            if truncated:
                keep = int(room)
                ids, offsets = ids[:keep], offsets[:keep]
                extras = {k: v[:keep] for k, v in extras.items()}
            prefix = "completion" if single else field
            out.update({f"{prefix}_input_ids": ids, f"{prefix}_offsets": offsets, f"{prefix}_text": text,
                        "truncated" if single else f"{field}_truncated": truncated, **extras})
        if self.kind == "prompt":
            out.update(completion_input_ids=[], completion_offsets=[], completion_text="", truncated=False)
        out.update({name: row[name] for name in _ROW_EXTRAS if name in row})
        out["source"], out["row"] = row.get("source"), row.get("row")
        return out

    def _per_token(self, field: str, offsets: list, n_text: int, n_total: int) -> dict[str, list]:
        """Token labels (token rows) or ``{field}_token_rewards`` (preference rows) of the response's
        ``n_total`` tokens: from spans, or values given per token without EOS (EOS then gets label
        IGNORE_INDEX, reward 0) or with it."""
        if self.kind == "token":
            if "spans" in self.row:
                return {"token_labels": spans_to_labels(offsets, self.row["spans"])}
            column, name, fill = "labels", "token_labels", IGNORE_INDEX
        else:  # only preference rows keep *_token_rewards
            column = name = f"{field}_token_rewards"
            fill = 0.0
            if name not in self.row:
                return {}
        values = list(self.row[column])
        if len(values) == n_total:
            return {name: values}
        if len(values) == n_text:
            return {name: values + [fill] * (n_total - n_text)}
        eos = f" ({n_total} with EOS)" if n_total != n_text else ""
        detail = f"{len(values)} values for a response of {n_text} tokens{eos}"
        raise self.error("length mismatch", column, detail)


def _keep_end(ids: list[int], limit: int, bos: int | None) -> list[int]:
    if bos is not None and ids[0] == bos and limit > 1:
        return [bos] + ids[len(ids) - (limit - 1) :]
    return ids[len(ids) - limit :]


def tokenize_rows(
    rows: Iterable[dict],
    tokenizer: Any,
    kind: str,
    limits: TokenLimits | None = None,
    *,
    add_eos: bool = True,
    skip_invalid: bool = False,
    skipped: Counter | None = None,
    source: str | None = None,
    chunk_size: int = 512,
) -> list[dict]:
    """Tokenize validated rows (from :func:`finegrain.data.schema.validate_rows`).

    Args:
        rows: normalised rows of one ``kind``.
        tokenizer: a Hugging Face fast tokenizer (``return_offsets_mapping`` needs one).
        kind: the row kind (:data:`finegrain.data.schema.KINDS`).
        limits: lengths and truncation policy; default :class:`TokenLimits()`.
        add_eos: append EOS to each response (see :func:`tokenize_response`).
        skip_invalid: skip rows that fail here (label length mismatch, over-long prompt with
            ``truncate_prompt=False``, text the tokenizer rejects) instead of raising; counted and logged.
        skipped: a counter to add the skip counts to.
        source: the data set's name for the log line (default: the first row's ``source``).
        chunk_size: rows per batched tokenizer call.

    Returns:
        One dict per kept row, in order (keys in the module docstring).

    Raises:
        DataError: the first row that cannot be tokenized, unless ``skip_invalid``.
    """
    if kind not in _RESPONSES:
        raise ValueError(f"unknown row kind {kind!r}; expected one of {', '.join(_RESPONSES)}")
    if getattr(tokenizer, "is_fast", True) is False:
        raise ConfigError("finegrain needs a fast (Rust) tokenizer for character offsets; load it with use_fast=True")
    limits = limits or TokenLimits()
    encode = _Encoder(tokenizer)
    out: list[dict] = []
    counts: Counter = Counter()
    cut_prompts = cut_responses = 0
    rows = list(rows)
    if not getattr(tokenizer, "chat_template", None) and any(r.get("conversational") for r in rows):
        logger.warning("the tokenizer has no chat template; conversational prompts use 'role: content' lines")
    for lo in range(0, len(rows), chunk_size):
        chunk = [_Tokenized(r, kind, tokenizer, limits, add_eos) for r in rows[lo : lo + chunk_size]]
        prompts: list[Any] = []
        for item in chunk:
            try:
                prompts.append(prompt_text(tokenizer, item.row["prompt"]))
            except Exception as e:  # a chat template may raise on the conversation (jinja TemplateError...)
                prompts.append(e)
        prompt_encs = _encode_prompts(encode, prompts)
        response_encs = [{} for _ in chunk]
        texts = [(i, f, item.row[f]) for i, item in enumerate(chunk) for f in item.fields]
        for (i, f, _), enc in zip(texts, encode([t for _, _, t in texts], False, True)):
            response_encs[i][f] = enc
        for item, p_enc, r_enc in zip(chunk, prompt_encs, response_encs):
            try:
                example = item.build(p_enc, r_enc)
            except DataError as e:
                if not skip_invalid:
                    raise e.add_hint(SKIP_HINT) from None
                counts[skip_key(e)] += 1
                continue
            cut_prompts += example["prompt_truncated"]
            cut_responses += any(example.get(k) for k in _TRUNCATED)
            out.append(example)
    name = source or (rows[0].get("source") if rows else None) or "<rows>"
    log_skips(counts, name, len(rows), "tokenization", skipped)
    if cut_prompts or cut_responses:
        logger.warning(
            "%s: %d of %d prompts kept their last %s tokens; %d rows had a response cut to fit max_length",
            name, cut_prompts, len(out), limits.prompt_limit, cut_responses,
        )
    return out


def _encode_prompts(encode: _Encoder, prompts: list[Any]) -> list[Any]:
    """Encode ``(text, add_special_tokens)`` pairs in two batched calls; exceptions pass through."""
    out: list[Any] = list(prompts)
    for special in (True, False):
        idx = [i for i, p in enumerate(prompts) if not isinstance(p, Exception) and p[1] is special]
        for i, enc in zip(idx, encode([prompts[i][0] for i in idx], special, False)):
            out[i] = enc
    return out

