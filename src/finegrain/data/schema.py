"""Row kinds, their columns, and validation of every row into plain python dicts.

Column names follow TRL (docs/source/dataset_formats.md), so TRL data sets load unchanged. Each value that holds
text may be *standard* (a string) or *conversational* (a list of ``{"role", "content"}`` messages). Columns not
named here are dropped.

Kinds, their columns, and the normalised row each gives (every normalised row also has ``conversational``, and
``source`` / ``row``: the file and the 0-based row in it):

* ``preference``: ``chosen``, ``rejected``, optional ``prompt`` (else implicit, see below) -> ``prompt``,
  ``chosen``, ``rejected``. Optional columns kept: ``subset`` (RewardBench style), ``margin``,
  ``chosen_token_rewards`` / ``rejected_token_rewards`` (one number per response token), ``ref_chosen_logps`` /
  ``ref_rejected_logps``. An optional column present in the data set must have a value on every row, and the
  chosen/rejected columns come in pairs.
* ``revision``: ``rejected``, ``revised``, optional ``prompt`` (else implicit) and ``chosen`` (may be missing
  row by row) -> ``prompt``, ``rejected``, ``revised``, ``chosen`` (or None).
* ``token``: ``prompt``, ``response`` and, per row, ``labels`` (one number per response token) or ``spans``
  (``[{"start", "end", "label"}]``, character offsets in the response, sorted and non-overlapping once checked)
  -> ``prompt``, ``response``, ``labels`` or ``spans`` (``(start, end, label)`` tuples).
* ``prompt``: ``prompt`` -> ``prompt``.
* ``sft``: ``prompt`` + ``completion``, or ``messages`` (the last message, an assistant turn, is the completion),
  or ``text`` (all completion, empty prompt) -> ``prompt``, ``completion``.

Responses (``chosen``, ``rejected``, ``revised``, ``response``, ``completion``) are normalised to their text: a
conversational response must be a single assistant message, and its ``content`` is the text. A conversational
prompt stays a list of messages (the tokenizer's chat template renders it).

**Implicit prompt** (no ``prompt`` column), as TRL's ``extract_prompt``:

* conversational: the prompt is every message but the last, which must be an assistant turn; the two
  conversations must agree on everything before it;
* strings: the longest common prefix of the two texts, cut back to its last whitespace character, which goes to
  the responses (``"Q: hi\\n\\nA: yes"`` / ``"Q: hi\\n\\nA: no"`` -> prompt ``"Q: hi\\n\\nA:"``, responses
  ``" yes"`` / ``" no"``). With no whitespace in the common prefix the prompt is empty (the tokenizer's BOS token
  is then the whole prompt).

**Validation.** Every row is checked: missing columns or values, wrong types (including non-string message
content), an empty prompt or response (empty or whitespace only), chosen identical to rejected, revised identical
to rejected, NaN/inf or non-numbers in numeric columns, malformed spans. Each problem is a
:class:`~finegrain.errors.DataError` naming the file, the row and the field. With ``skip_invalid=True`` bad rows
are skipped instead, counted per reason, and one summary line is logged (``logging`` warning); a column missing
from the whole data set is never skipped. Identical chosen/rejected (or revised/rejected) rows are errors by default
like any other bad row: they carry no preference signal and usually mean a data bug.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Real
from typing import Any

from finegrain.data.loading import Rows, load_rows
from finegrain.errors import SKIP_HINT, DataError

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("preference", "revision", "token", "prompt", "sft")
"""The row kinds :func:`validate_rows` knows."""

PREFERENCE_EXTRAS: tuple[str, ...] = (
    "subset",
    "margin",
    "chosen_token_rewards",
    "rejected_token_rewards",
    "ref_chosen_logps",
    "ref_rejected_logps",
)
"""Optional columns of preference rows that are kept (all others are dropped)."""

# The columns every data set of a kind needs (the alternatives of token and sft rows are checked apart), and
# how messages describe the kind's columns.
_COLUMNS = {
    "preference": (("chosen", "rejected"), "chosen, rejected and optionally prompt"),
    "revision": (("rejected", "revised"), "rejected, revised and optionally prompt, chosen"),
    "token": (("prompt", "response"), "prompt, response and labels or spans"),
    "prompt": (("prompt",), "prompt"),
    "sft": ((), "prompt and completion, or messages, or text"),
}


# ------------------------------------------------------------------------------------------------------- errors


def row_error(reason: str, *, source: str | None, row: int | None, field: str | None, detail: str = "") -> DataError:
    """A :class:`DataError` whose short ``reason`` (e.g. ``"empty response"``) is what skips are counted by."""
    err = DataError(f"{reason}: {detail}" if detail else reason, source=source, row=row, field=field)
    err.code = reason
    return err


def skip_key(err: DataError) -> str:
    """The key a skipped row is counted under: its reason and field, e.g. ``"empty response in 'rejected'"``."""
    reason = getattr(err, "code", err.reason)
    return f"{reason} in '{err.field}'" if err.field else reason


def log_skips(
    counts: Mapping[str, int], source: str, total: int, stage: str, skipped: Counter | None = None
) -> None:
    """Log one line summarising the rows skipped at ``stage``, if any, and add their counts to ``skipped``."""
    if skipped is not None:
        skipped.update(counts)
    n = sum(counts.values())
    if n:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        logger.warning("%s: skipped %d of %d rows at %s (%s)", source, n, total, stage, detail)


class RowCheck:
    """Where a row came from, and checks that raise errors naming it (the field checks of :func:`validate_rows`;
    ``label revise`` checks rows without a ``chosen`` column with them)."""

    def __init__(self, raw: Mapping[str, Any], source: str, row: int):
        self.raw, self.source, self.row = raw, source, row

    def error(self, reason: str, field: str | None, detail: str = "") -> DataError:
        return row_error(reason, source=self.source, row=self.row, field=field, detail=detail)

    def get(self, field: str) -> Any:
        value = self.raw.get(field)
        if value is None:
            raise self.error("missing value", field)
        return value

    def string(self, value: Any, field: str, what: str) -> str:
        if not isinstance(value, str):
            raise self.error("wrong type", field, f"expected a string, got {type(value).__name__}")
        self.encodable(value, field)
        if not value.strip():
            raise self.error(f"empty {what}", field)
        return value

    def encodable(self, text: str, field: str) -> None:
        """Reject lone surrogates (JSON can hold ``"\\ud800"``), which no tokenizer accepts."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise self.error("invalid text", field, f"character {e.start} is not valid unicode") from None

    def messages(self, value: Any, field: str) -> list[dict]:
        if not isinstance(value, (list, tuple)):
            raise self.error("wrong type", field, f"expected a string or a list of messages, got {type(value).__name__}")
        out = []
        for j, m in enumerate(value):
            if not isinstance(m, Mapping):
                raise self.error("wrong type", field, f"message {j} is a {type(m).__name__}, expected a dict")
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not role:
                raise self.error("wrong type", field, f"message {j} has no string 'role'")
            self.encodable(role, field)
            if not isinstance(content, str):
                raise self.error("non-string content", field, f"message {j} content is {type(content).__name__}")
            self.encodable(content, field)
            out.append(dict(m))
        return out

    def prompt(self, value: Any, field: str = "prompt") -> str | list[dict]:
        if isinstance(value, str):
            return self.string(value, field, "prompt")
        msgs = self.messages(value, field)
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise self.error("empty prompt", field)
        return msgs

    def response(self, value: Any, field: str, *, allow_empty: bool = False) -> str:
        """A response's text: a string, or the content of a single assistant message. With ``allow_empty`` an
        empty (or whitespace-only) text is kept: it becomes an EOS-only response when tokenized."""
        if not isinstance(value, str):
            msgs = self.messages(value, field)
            if len(msgs) != 1 or msgs[0]["role"] != "assistant":
                roles = [m["role"] for m in msgs]
                raise self.error("wrong type", field,
                                 f"a response must be one assistant message, got roles {roles}")
            value = msgs[0]["content"]
        if allow_empty and not value.strip():
            self.encodable(value, field)
            return value
        return self.string(value, field, "response")

    def number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise self.error("wrong type", field, f"expected a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise self.error("non-finite value", field, f"{value}")
        return float(value)

    def numbers(self, value: Any, field: str, *, integers: bool = False) -> list:
        """A list of finite numbers; ints (and bools, as 0/1) stay ints when ``integers`` and all are integral."""
        if not isinstance(value, (list, tuple)):
            raise self.error("wrong type", field, f"expected a list of numbers, got {type(value).__name__}")
        out = []
        for j, v in enumerate(value):
            if not isinstance(v, Real) or (isinstance(v, bool) and not integers):
                raise self.error("wrong type", field, f"element {j} is {type(v).__name__}, expected a number")
            if not math.isfinite(v):
                raise self.error("non-finite value", field, f"element {j} is {v}")
            out.append(v)
        if integers and all(isinstance(v, int) for v in out):
            return [int(v) for v in out]
        return [float(v) for v in out]


# ----------------------------------------------------------------------------------------------- implicit prompt


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit prompt off two responses that share it (TRL's ``extract_prompt`` convention).

    Args:
        chosen: a string, or a list of messages ending with an assistant turn.
        rejected: the same kind of value as ``chosen``.

    Returns:
        ``(prompt, chosen_rest, rejected_rest)``. For strings the prompt is the longest common prefix cut back to
        its last whitespace character (which stays with the responses); for messages it is every message but the
        last, whose ``chosen_rest`` / ``rejected_rest`` are the final messages.

    Raises:
        ValueError: conversations that differ before their last message, or values of different kinds.

    Example:
        >>> extract_prompt("Q: sky?\\n\\nA: blue", "Q: sky?\\n\\nA: green")
        ('Q: sky?\\n\\nA:', ' blue', ' green')
        >>> extract_prompt("The cat sat", "The cap sat")
        ('The', ' cat sat', ' cap sat')
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = len(os.path.commonprefix([chosen, rejected]))
        k = max((i for i in range(n) if chosen[i].isspace()), default=0)  # the last whitespace of the prefix
        return chosen[:k], chosen[k:], rejected[k:]
    if isinstance(chosen, list) and isinstance(rejected, list):
        if chosen[:-1] != rejected[:-1]:
            raise ValueError("chosen and rejected differ before their last message, so no prompt is shared")
        return chosen[:-1], chosen[-1:], rejected[-1:]
    raise ValueError("chosen and rejected must both be strings or both lists of messages")


def _pair(r: RowCheck, first: str, second: str, explicit_prompt: bool,
          allow_empty: bool = False) -> tuple[Any, str, str]:
    """Prompt and the two response texts of a row with two responses, explicit or implicit prompt (with an explicit
    prompt, ``allow_empty`` keeps empty responses: EOS-only samples)."""
    a, b = r.get(first), r.get(second)
    if explicit_prompt:
        return (r.prompt(r.get("prompt")), r.response(a, first, allow_empty=allow_empty),
                r.response(b, second, allow_empty=allow_empty))
    if isinstance(a, str) and isinstance(b, str):
        r.string(a, first, "response"), r.string(b, second, "response")
        if a == b:
            raise r.error(f"{first} identical to {second}", second)
        prompt, a, b = extract_prompt(a, b)
        return prompt, r.response(a, first), r.response(b, second)
    msgs_a, msgs_b = r.messages(a, first), r.messages(b, second)
    for msgs, field in ((msgs_a, first), (msgs_b, second)):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise r.error("wrong type", field, "an implicit-prompt conversation must end with an assistant message")
    try:
        prompt, a, b = extract_prompt(msgs_a, msgs_b)
    except ValueError as e:
        raise r.error("prompts differ", second, str(e)) from None
    if not prompt:
        raise r.error("empty prompt", first, "the conversation has no message before the assistant's")
    return r.prompt(prompt, first), r.response(a, first), r.response(b, second)


# ------------------------------------------------------------------------------------------------ normalisers


def _preference(r: RowCheck, columns: frozenset[str]) -> dict:
    # an empty response is a legitimate sample (a policy that ends at once): it is scored as EOS only
    prompt, chosen, rejected = _pair(r, "chosen", "rejected", "prompt" in columns, allow_empty=True)
    if chosen == rejected:
        raise r.error("chosen identical to rejected", "rejected")
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "conversational": isinstance(prompt, list)}
    for name in PREFERENCE_EXTRAS:
        if name not in columns:
            continue
        value = r.get(name)
        if name == "subset":
            out[name] = value if isinstance(value, str) else r.string(value, name, "subset")
        elif name.endswith("token_rewards"):
            out[name] = r.numbers(value, name)
        else:
            out[name] = r.number(value, name)
    return out


def _revision(r: RowCheck, columns: frozenset[str]) -> dict:
    prompt, rejected, revised = _pair(r, "rejected", "revised", "prompt" in columns)
    if revised == rejected:
        raise r.error("revised identical to rejected", "revised")
    chosen = r.raw.get("chosen")  # optional per row: revisions are trained on (rejected, revised)
    if chosen is not None:
        chosen = r.response(chosen, "chosen")
    return {"prompt": prompt, "rejected": rejected, "revised": revised, "chosen": chosen,
            "conversational": isinstance(prompt, list)}


def _spans(r: RowCheck, value: Any, response: str) -> list[tuple[int, int, float | int]]:
    if not isinstance(value, (list, tuple)):
        raise r.error("wrong type", "spans", f"expected a list of spans, got {type(value).__name__}")
    spans = []
    for j, s in enumerate(value):
        if isinstance(s, Mapping):
            start, end, label = s.get("start"), s.get("end"), s.get("label")
        elif isinstance(s, (list, tuple)) and len(s) == 3:
            start, end, label = s
        else:
            raise r.error("wrong type", "spans", f"span {j} must be {{'start', 'end', 'label'}}")
        if any(isinstance(x, bool) or not isinstance(x, int) for x in (start, end)):
            raise r.error("wrong type", "spans", f"span {j} start/end must be integers")
        if not 0 <= start < end <= len(response):
            raise r.error(
                "bad span", "spans", f"span {j} ({start}, {end}) is empty or outside the response of {len(response)} chars"
            )
        (label,) = r.numbers([label], "spans", integers=True)
        spans.append((start, end, label))
    spans.sort()
    for (s0, e0, _), (s1, e1, _) in zip(spans, spans[1:]):
        if s1 < e0:
            raise r.error("bad span", "spans", f"spans ({s0}, {e0}) and ({s1}, {e1}) overlap")
    return spans


def _token(r: RowCheck, columns: frozenset[str]) -> dict:
    prompt = r.prompt(r.get("prompt"))
    response = r.response(r.get("response"), "response")
    out = {"prompt": prompt, "response": response, "conversational": isinstance(prompt, list)}
    labels, spans = r.raw.get("labels"), r.raw.get("spans")
    if labels is not None and spans is not None:
        raise r.error("wrong type", "labels", "give per-token labels or character spans, not both")
    if spans is not None or "labels" not in columns:
        out["spans"] = _spans(r, r.get("spans"), response)
        return out
    labels = r.numbers(r.get("labels"), "labels", integers=True)
    if not labels:
        raise r.error("empty labels", "labels")
    out["labels"] = labels
    return out


def _prompt_only(r: RowCheck, columns: frozenset[str]) -> dict:
    prompt = r.prompt(r.get("prompt"))
    return {"prompt": prompt, "conversational": isinstance(prompt, list)}


def _sft(r: RowCheck, columns: frozenset[str]) -> dict:
    if "prompt" in columns and "completion" in columns:
        prompt = r.prompt(r.get("prompt"))
        completion = r.response(r.get("completion"), "completion", allow_empty=True)
    elif "messages" in columns:
        msgs = r.messages(r.get("messages"), "messages")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise r.error("wrong type", "messages", "the conversation must end with an assistant message")
        prompt = r.prompt(msgs[:-1], "messages")
        completion = r.string(msgs[-1]["content"], "messages", "response")
    else:
        prompt, completion = "", r.string(r.get("text"), "text", "response")
    return {"prompt": prompt, "completion": completion, "conversational": isinstance(prompt, list)}


_NORMALISERS: dict[str, Callable[[RowCheck, frozenset[str]], dict]] = {
    "preference": _preference,
    "revision": _revision,
    "token": _token,
    "prompt": _prompt_only,
    "sft": _sft,
}


# -------------------------------------------------------------------------------------------------------- kinds


def detect_kind(columns: Iterable[str], *, source: str | None = None) -> str:
    """The row kind of a data set from its column names.

    Args:
        columns: the column names.
        source: the data set's name, for the error message.

    Returns:
        One of :data:`KINDS`.

    Raises:
        DataError: the columns match no kind (or a TRL kind finegrain does not train on).

    Example:
        >>> detect_kind(["prompt", "chosen", "rejected"]), detect_kind(["chosen", "rejected"])
        ('preference', 'preference')
        >>> detect_kind(["prompt", "rejected", "revised"]), detect_kind(["messages"])
        ('revision', 'sft')
    """
    cols = set(columns)
    if {"rejected", "revised"} <= cols:
        return "revision"
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if "response" in cols and cols & {"labels", "spans"}:
        return "token"
    if {"completions", "labels"} <= cols:
        raise DataError(
            "stepwise supervision (prompt, completions, labels) is not supported; give token supervision as "
            "prompt, response and spans (one span per step)",
            source=source,
        )
    if {"completion", "label"} <= cols:
        raise DataError(
            "unpaired preference data (prompt, completion, label) is not supported; give pairs as prompt, chosen, "
            "rejected",
            source=source,
        )
    if {"prompt", "completion"} <= cols or "messages" in cols or "text" in cols:
        return "sft"
    if "prompt" in cols:
        return "prompt"
    raise DataError(
        f"cannot tell the kind of rows from the columns {sorted(cols)}; expected one of: "
        + "; ".join(f"{k}: {expected}" for k, (_, expected) in _COLUMNS.items()),
        source=source,
    )


def check_columns(kind: str, columns: Iterable[str], *, source: str | None = None) -> None:
    """Raise a :class:`DataError` naming the first column that rows of ``kind`` need and the data set lacks."""
    if kind not in _NORMALISERS:
        raise ValueError(f"unknown row kind {kind!r}; expected one of {', '.join(KINDS)}")
    cols = set(columns)
    need, expected = _COLUMNS[kind]
    missing = [c for c in need if c not in cols]
    if kind == "preference":  # per-response columns come in chosen/rejected pairs
        for a, b in (("chosen_token_rewards", "rejected_token_rewards"), ("ref_chosen_logps", "ref_rejected_logps")):
            if (a in cols) != (b in cols):
                missing.append(b if a in cols else a)
    if kind == "token" and not missing and not cols & {"labels", "spans"}:
        missing = ["labels"]
    if kind == "sft" and not ({"prompt", "completion"} <= cols or cols & {"messages", "text"}):
        missing = ["completion" if "prompt" in cols else "text"]
    if missing:
        raise DataError(
            f"missing column '{missing[0]}'; rows of kind '{kind}' need {expected} "
            f"(columns found: {', '.join(sorted(cols)) or 'none'})",
            source=source,
            field=missing[0],
        )


def validate_rows(
    rows: Rows | Sequence[Mapping[str, Any]] | Any,
    kind: str | None = None,
    *,
    skip_invalid: bool = False,
    skipped: Counter | None = None,
) -> list[dict]:
    """Validate and normalise every row of a data set.

    Args:
        rows: :class:`~finegrain.data.loading.Rows` (from :func:`~finegrain.data.loading.load_rows`) or anything
            ``load_rows`` accepts.
        kind: one of :data:`KINDS`; None detects it from the columns with :func:`detect_kind`.
        skip_invalid: skip bad rows (counted per reason, one summary line logged) instead of raising.
        skipped: a counter to add the skip counts to (keys as in :func:`skip_key`).

    Returns:
        One plain dict per kept row, in source order, with the fields of the module table plus ``source`` (the
        file) and ``row`` (the 0-based row index in that file).

    Raises:
        DataError: the first bad row (unless ``skip_invalid``), or a column missing from the whole data set.

    Example:
        >>> validate_rows([{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}])
        [{'prompt': '2+2=', 'chosen': ' 4', 'rejected': ' 5', 'conversational': False, 'source': '<list>', 'row': 0}]
    """
    rows = load_rows(rows)
    columns = frozenset(rows.column_names)
    kind = kind or detect_kind(columns, source=rows.source)
    check_columns(kind, columns, source=rows.source)
    normalise = _NORMALISERS[kind]
    out: list[dict] = []
    counts: Counter = Counter()
    for i, raw in enumerate(rows):
        source, row = rows.locate(i)
        try:
            item = normalise(RowCheck(raw, source, row), columns)
        except DataError as e:
            if not skip_invalid:
                raise e.add_hint(SKIP_HINT) from None
            counts[skip_key(e)] += 1
            continue
        item["source"], item["row"] = source, row
        out.append(item)
    log_skips(counts, rows.source, len(rows), "validation", skipped)
    return out
