"""Token-credit evaluation: how well each reward source ranks response tokens by their ground-truth credit.

Given responses whose tokens carry ground-truth credit and one or more reward sources, every source scores the
same responses in the policy's tokenization (:meth:`~finegrain.rewards.RewardSource.token_rewards`), and
:func:`finegrain.eval.metrics.evaluate_token_credit` ranks its per-token rewards against the truth, pooled over all
responses: AUROC of positive-credit versus negative-credit tokens (neutral tokens left out) and precision@k. The
result is the run directory's ``token_credit.json`` (docs/run-directory.md), whose examples are drawn as heatmaps by
``finegrain report``.

Ground truth, by the data set's columns (each described in docs/evaluation.md, "Token-credit evaluation"):
``{prompt, response, words, credit}`` per-word credit, as the built-in world writes ``data/credit_test.jsonl``
(mapped to tokens by :func:`word_credit_to_tokens`); ``{prompt, response, labels | spans}`` token supervision rows
(``finegrain label edits`` output); ``{prompt, rejected, revised}`` revision rows, whose two responses are labelled
by edit alignment (:func:`finegrain.data.alignment.edit_token_labels`: changed tokens of the rejected response -1,
of the revision +1, everything else neutral).

Sources (:func:`resolve_credit_sources`; ``NAME=SPEC`` names a source; the table is in docs/evaluation.md):
``oracle-credit`` (the truth itself, AUROC 1), any reward spec of :mod:`finegrain.rewards.registry`, and in Python
any object with ``token_rewards(batch) -> TokenRewards``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegrain.errors import ConfigError, DataError
from finegrain.eval.metrics import evaluate_token_credit
from finegrain.types import CompletionBatch, TokenRewards

__all__ = [
    "ORACLE_CREDIT",
    "CreditExample",
    "evaluate_token_credit_sources",
    "load_credit_examples",
    "resolve_credit_sources",
    "score_token_credit",
    "word_credit_to_tokens",
]

ORACLE_CREDIT = "oracle-credit"
"""Source spec of the ground truth itself (a sanity check: its AUROC is 1 whenever both classes exist)."""


@dataclass
class CreditExample:
    """One response with ground-truth credit on each of its tokens (policy tokenization).

    Fields:
        prompt: the raw prompt (a string or a list of messages).
        prompt_input_ids: the prompt's token ids, as the data layer tokenizes prompts.
        text: the response text.
        input_ids: ``(T,)`` response token ids, EOS appended unless the response was cut at ``max_length``.
        offsets: ``(T,)`` ``(start, end)`` character offsets in ``text`` (``(len, len)`` for the EOS).
        truth: ``(T,)`` ground-truth credit per token; 0 marks a neutral token (no ground truth).
        source: the file the row came from.
        row: the row's 0-based index in that file.
    """

    prompt: Any
    prompt_input_ids: list[int]
    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    truth: list[float]
    source: str | None = None
    row: int | None = None


# ------------------------------------------------------------------------------------------------ ground truth


def word_credit_to_tokens(
    text: str,
    words: Sequence[str],
    credit: Sequence[float],
    offsets: Sequence[tuple[int, int]],
    *,
    source: str | None = None,
    row: int | None = None,
) -> list[float]:
    """Per-token credit from per-word credit, through character offsets.

    Word ``j`` is found in ``text`` at or after the end of word ``j - 1`` (``str.find``), giving a character span
    ``[s_j, e_j)``. Token ``[a, b)`` then takes the credit of the word it overlaps by the most characters (ties: the
    earlier word; :func:`finegrain.data.tokenize.spans_to_labels`), and 0 (neutral) when it overlaps no word (EOS,
    whitespace-only tokens). A word split into several tokens gives each of them its full credit, so the sign of a
    token's credit is its word's.

    Args:
        text: the response text.
        words: the response's words, in order (each a substring of ``text``).
        credit: one number per word.
        offsets: ``(start, end)`` character offsets of the policy tokens of ``text``.
        source: file name for error messages.
        row: row index for error messages.

    Returns:
        One float per token.

    Raises:
        DataError: ``words`` and ``credit`` differ in length, a credit is not a finite number, or a word is not
            found in the text (in order).

    Example:
        >>> word_credit_to_tokens("it flows gently", ["it", "flows", "gently"], [0.0, 1.0, -0.5],
        ...                       [(0, 2), (3, 6), (6, 8), (9, 15), (15, 15)])
        [0.0, 1.0, 1.0, -0.5, 0.0]
    """
    from finegrain.data.tokenize import spans_to_labels

    if len(words) != len(credit):
        raise DataError(f"{len(words)} words but {len(credit)} credit values", source=source, row=row, field="credit")
    spans, cursor = [], 0
    for j, (word, value) in enumerate(zip(words, credit)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"credit {j} is {value!r}, not a finite number", source=source, row=row, field="credit")
        if not isinstance(word, str) or not word:
            raise DataError(f"word {j} is {word!r}, not a non-empty string", source=source, row=row, field="words")
        start = text.find(word, cursor)
        if start < 0:
            raise DataError(
                f"word {j} {word!r} is not in the response after character {cursor}; the words must be the "
                "response's words in order",
                source=source, row=row, field="words",
            )
        spans.append((start, start + len(word), float(value)))
        cursor = start + len(word)
    return [float(v) for v in spans_to_labels([tuple(o) for o in offsets], spans, fill=0.0)]


def _columns_kind(columns: set[str], source: str) -> str:
    if {"words", "credit"} <= columns:
        return "credit"
    if {"rejected", "revised"} <= columns:
        return "revision"
    if "response" in columns and columns & {"labels", "spans"}:
        return "token"
    raise DataError(
        f"cannot tell the ground truth from the columns {sorted(columns)}; expected prompt, response, words, credit "
        "(word credit, as the world's data/credit_test.jsonl); prompt, response and labels or spans (token labels, "
        "as `finegrain label edits` writes); or prompt, rejected, revised (revisions, labelled by edit alignment)",
        source=source,
    )


def _example(tok_row: dict, truth: list[float], response: str = "completion") -> CreditExample:
    return CreditExample(
        prompt=tok_row["prompt"], prompt_input_ids=list(tok_row["prompt_input_ids"]),
        text=tok_row[f"{response}_text"], input_ids=list(tok_row[f"{response}_input_ids"]),
        offsets=[tuple(o) for o in tok_row[f"{response}_offsets"]], truth=[float(v) for v in truth],
        source=tok_row.get("source"), row=tok_row.get("row"),
    )


def load_credit_examples(
    data: Any,
    tokenizer: Any,
    *,
    split: str | None = None,
    max_rows: int | None = None,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    unit: str = "word",
) -> list[CreditExample]:
    """Load a data set with ground-truth credit and tokenize it with the policy tokenizer.

    The three row formats are in the module docstring (docs/evaluation.md in full). Prompts and responses are tokenized as the data layer does
    (:func:`finegrain.data.tokenize.tokenize_rows`: EOS appended, an over-long prompt keeps its end, a response cut
    at ``max_length`` loses its EOS), so the batches are exactly those a trainer would see.

    Args:
        data: anything :func:`finegrain.data.load_rows` accepts (path, hub id, ``Dataset``, list of dicts).
        tokenizer: the policy's fast tokenizer.
        split: the split to read (None: the default split).
        max_rows: read only the first rows.
        max_length: prompt + response token limit.
        max_prompt_length: prompt token limit.
        unit: alignment unit for revision rows (``"word"``, ``"token"`` or ``"char"``).

    Returns:
        One :class:`CreditExample` per response (two per revision row).

    Raises:
        DataError: unknown columns or a bad row (naming the file, row and field).
    """
    from finegrain.data.alignment import edit_token_labels
    from finegrain.data.loading import load_rows
    from finegrain.data.schema import validate_rows
    from finegrain.data.tokenize import IGNORE_INDEX, TokenLimits, tokenize_rows

    rows = load_rows(data, split)
    if max_rows is not None:
        rows = rows.head(max_rows)
    if len(rows) == 0:
        raise DataError("no rows", source=rows.source)
    limits = TokenLimits(max_length=max_length, max_prompt_length=max_prompt_length)
    kind = _columns_kind(set(rows.column_names), rows.source)

    if kind == "token":
        tokenized = tokenize_rows(validate_rows(rows, "token"), tokenizer, "token", limits)
        return [_example(t, [0.0 if v == IGNORE_INDEX else float(v) for v in t["token_labels"]]) for t in tokenized]

    if kind == "revision":  # the optional chosen response is not scored
        valid = [{**v, "chosen": None} for v in validate_rows(rows, "revision")]
        out = []
        for t in tokenize_rows(valid, tokenizer, "revision", limits):
            try:
                labels = edit_token_labels(t["rejected_text"], t["revised_text"], t["rejected_offsets"],
                                           t["revised_offsets"], unit=unit, rejected_ids=t["rejected_input_ids"],
                                           revised_ids=t["revised_input_ids"])
            except DataError as err:
                raise DataError(err.reason, source=t["source"], row=t["row"], field=err.field) from err
            out += [_example(t, labels.rejected_labels, "rejected"), _example(t, labels.revised_labels, "revised")]
        return out

    # Word credit: validate prompt and response as an sft row (the response is the completion), then map words.
    for name in ("prompt", "response"):
        if name not in rows.column_names:
            raise DataError(f"missing column '{name}'; word-credit rows need prompt, response, words, credit",
                            source=rows.source, field=name)
    as_sft = rows.map(lambda r, _: {"prompt": r.get("prompt"), "completion": r.get("response")})  # same origins
    try:
        valid = validate_rows(as_sft, "sft")
    except DataError as err:
        field = "response" if err.field == "completion" else err.field
        raise DataError(err.reason, source=err.source, row=err.row, field=field) from err
    tokenized = tokenize_rows(valid, tokenizer, "sft", limits)
    out = []
    for raw, t in zip(rows, tokenized):
        words, credit = raw.get("words"), raw.get("credit")
        if not isinstance(words, list) or not isinstance(credit, list):
            raise DataError("words and credit must be lists", source=t["source"], row=t["row"], field="words")
        truth = word_credit_to_tokens(t["completion_text"], words, credit, t["completion_offsets"],
                                      source=t["source"], row=t["row"])
        out.append(_example(t, truth))
    return out


# ------------------------------------------------------------------------------------------------ sources


class TruthSource:
    """The ground truth itself as a reward source (``oracle-credit``; its AUROC is 1 whenever both classes exist):
    reads ``batch.extras["truth"]`` ``(N, T)``, which :func:`score_token_credit` puts on every batch."""

    def __init__(self, name: str | None = None):
        self.name = name or ORACLE_CREDIT

    def token_rewards(self, batch: CompletionBatch) -> TokenRewards:
        mask = batch.completion_mask.to(torch.bool)
        return TokenRewards(values=batch.extras["truth"].float() * mask, mask=mask)


def resolve_credit_sources(specs: Sequence[Any] | Mapping[str, Any], context: Any) -> dict[str, Any]:
    """Turn source specs into named reward sources: ``oracle-credit`` (the truth, :class:`TruthSource`) or any reward
    spec of :mod:`finegrain.rewards.registry` (``contrastive``, ``implicit[:DIR]``, a reward-model directory,
    ``python:module:function``, a registered kind; ``NAME=SPEC`` names one), or reward-source objects.

    A sentence RM places each sentence's term on its last token (right for PPO); credit is judged per word, so here
    each term is spread over its sentence's tokens, as ``finegrain rm``'s own evaluation does.

    Args:
        specs: spec strings or reward-source objects; or a mapping name -> spec / object.
        context: the :class:`~finegrain.rewards.registry.SourceContext` (policy tokenizer, reference, model loader).

    Returns:
        An ordered mapping name -> source, named as :func:`~finegrain.rewards.registry.reward_sources` names them
        ("truth" is kept for the ground truth's own row).
    """
    from finegrain.rewards.registry import reward_sources, split_name

    def truth(spec: Any) -> Any:  # NAME=oracle-credit -> TruthSource(NAME); anything else is the registry's
        name, body = split_name(spec) if isinstance(spec, str) else (None, spec)
        return TruthSource(name) if body == ORACLE_CREDIT else spec

    specs = {k: truth(v) for k, v in specs.items()} if isinstance(specs, Mapping) else [truth(s) for s in specs]
    out = reward_sources(specs, context, reserved=("truth",))
    for source in out.values():
        if getattr(source, "spread", True) is False:
            source.spread = True
    return out


# ------------------------------------------------------------------------------------------------ scoring


def _token_texts(example: CreditExample, tokenizer: Any) -> list[str]:
    """The text of each response token: its slice of the response, or the token's name when it has none (EOS)."""
    names = tokenizer.convert_ids_to_tokens(example.input_ids) if tokenizer is not None else None
    return [example.text[s:e] if e > s else str(names[j]) if names is not None else ""
            for j, (s, e) in enumerate(example.offsets)]


def _score_rows(source: Any, examples: list[CreditExample], pad_id: int, batch_size: int,
                device: str | torch.device) -> list[np.ndarray]:
    from finegrain.data.collate import collate_completions
    from finegrain.rewards.base import check_finite

    name = str(getattr(source, "name", type(source).__name__))
    if not callable(getattr(source, "token_rewards", None)):
        raise ConfigError(f"token-credit source '{name}' has no token_rewards(batch) method")
    out: list[np.ndarray] = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        # the truth is padded as a per-token reward (float32, 0 on padding), then named for TruthSource
        batch = collate_completions([{"prompt_input_ids": e.prompt_input_ids,
                                      "completion_input_ids": e.input_ids, "token_rewards": e.truth}
                                     for e in chunk], pad_id)
        batch.extras["truth"] = batch.extras.pop("token_rewards")
        batch.prompts, batch.responses = [e.prompt for e in chunk], [e.text for e in chunk]
        batch = batch.to(device)
        with torch.no_grad():
            rewards = source.token_rewards(batch)
        if tuple(rewards.values.shape) != tuple(batch.completion_input_ids.shape):
            raise ValueError(f"token-credit source '{name}' returned values of shape "
                             f"{tuple(rewards.values.shape)} for a batch of {tuple(batch.completion_input_ids.shape)}")
        check_finite(rewards, name)
        values = torch.where(rewards.mask.to(torch.bool), rewards.values, torch.zeros_like(rewards.values))
        values = values.detach().to("cpu", torch.float64).numpy()
        out += [values[i, : len(e.input_ids)].copy() for i, e in enumerate(chunk)]
    return out


def _pick_examples(examples: list[CreditExample], k: int) -> list[int]:
    """Indices of ``k`` examples for the heatmaps: first those with both positive and negative truth."""
    mixed = [any(v > 0 for v in e.truth) and any(v < 0 for v in e.truth) for e in examples]
    return sorted(sorted(range(len(examples)), key=lambda i: not mixed[i])[:k])  # a stable sort: order kept


def json_value(value):
    """JSON-safe: NaN/inf become None, numpy scalars Python numbers."""
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def score_token_credit(
    sources: Mapping[str, Any],
    examples: list[CreditExample],
    tokenizer: Any,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    num_examples: int = 8,
    eps: float = 1e-6,
) -> dict[str, Any]:
    """Score every source on ``examples`` and build the content of ``token_credit.json``.

    For source ``s`` the per-token rewards ``v^s_it`` of all responses are pooled, and
    ``auroc[s] = AUROC(v^s | credit ≠ 0, credit > 0)`` and ``precision_at_k[s]`` (``k`` = number of positive
    tokens) come from :func:`finegrain.eval.metrics.evaluate_token_credit` with neutral band ``eps``. Rewards at
    tokens outside a source's mask count as 0.

    Args:
        sources: name -> reward source (from :func:`resolve_credit_sources`, or any object with
            ``token_rewards(batch)``).
        examples: from :func:`load_credit_examples`.
        tokenizer: the policy tokenizer (token texts; pad id).
        batch_size: responses per call of a source.
        device: where batches go.
        num_examples: responses written out for the heatmaps (those with both positive and negative credit first).
        eps: neutral band of the credit.

    Returns:
        ``{"examples": [{"prompt", "tokens", "sources": {"truth": [...], NAME: [...]}}], "auroc": {NAME: float},
        "precision_at_k": {...}, "k": {...}, "n_pos", "n_neg", "n_neutral", "num_responses"}``; an undefined AUROC
        (a class is empty) is None.
    """
    from finegrain.data.collate import pad_token_id

    if not examples:
        raise DataError("no responses to score for token credit")
    pad_id = pad_token_id(tokenizer)
    truth = [np.asarray(e.truth, dtype=np.float64) for e in examples]
    picked = _pick_examples(examples, num_examples)
    shown = [{"prompt": examples[i].prompt if isinstance(examples[i].prompt, str) else json.dumps(examples[i].prompt),
              "tokens": _token_texts(examples[i], tokenizer), "sources": {"truth": truth[i].tolist()}} for i in picked]
    result: dict[str, Any] = {"examples": shown, "auroc": {}, "precision_at_k": {}, "k": {}}
    for name, source in sources.items():
        rows = _score_rows(source, examples, pad_id, batch_size, device)
        res = evaluate_token_credit(rows, truth, eps=eps)
        for key in ("auroc", "precision_at_k", "k"):
            result[key][name] = json_value(getattr(res, key))
        for item, i in zip(shown, picked):
            item["sources"][name] = rows[i].tolist()
    counts = evaluate_token_credit(truth, truth, eps=eps)  # the class sizes depend on the truth alone
    result.update(n_pos=counts.n_pos, n_neg=counts.n_neg, n_neutral=counts.n_neutral, num_responses=len(examples))
    return result


# ------------------------------------------------------------------------------------------------ entry point


def mark_eval_dir(out: Path) -> None:
    """Write ``run.json`` (command ``eval``) into an evaluation-only directory; a run's own run.json is kept."""
    if not (out / "run.json").exists():
        from finegrain import __version__

        (out / "run.json").write_text(json.dumps({"command": "eval", "method": "eval", "status": "completed",
                                                  "finegrain_version": __version__}, indent=2))


def evaluate_token_credit_sources(
    sources: Sequence[Any] | Mapping[str, Any],
    *,
    data: Any,
    split: str | None = None,
    tokenizer: Any = None,
    policy: str | None = None,
    reference: str | None = None,
    output_dir: str | Path | None = None,
    max_rows: int | None = None,
    num_examples: int = 8,
    unit: str = "word",
    batch_size: int = 16,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    quiet: bool = False,
    models: Any = None,
    contrastive_template: Any = None,
) -> dict[str, Any]:
    """Token-credit AUROC and precision@k of reward sources; writes ``token_credit.json`` when ``output_dir`` is set.

    Args:
        sources: source specs or objects (see :func:`resolve_credit_sources`).
        data: the data set with ground truth (module docstring).
        split: its split.
        tokenizer: the policy tokenizer (a loaded tokenizer or a path); default: the policy's, else the reference's.
        policy: the policy directory bare ``implicit`` refers to.
        reference: the reference model directory (``contrastive``, ``implicit``).
        output_dir: where ``token_credit.json`` goes (None: not written).
        max_rows: read only the first rows of ``data``.
        num_examples: responses written for the heatmaps.
        unit: alignment unit for revision rows.
        batch_size: responses per call of a source.
        device: ``"cpu"``, ``"cuda"``, ...; None picks CUDA when available.
        dtype: model dtype (``float32``, ``bfloat16``, ``float16``; None: as saved / float32).
        trust_remote_code: allow custom model code from the hub.
        quiet: do not print the table.
        models: a :class:`finegrain.models.loading.ModelCache` to share loaded models with other calls.
        contrastive_template: the :class:`~finegrain.rewards.contrastive.ContrastiveTemplate` of ``contrastive``
            (None: the draft-revision form).

    Returns:
        The content of ``token_credit.json`` (see :func:`score_token_credit`) plus ``data``.
    """
    from finegrain.data.files import write_text
    from finegrain.models.loading import ModelCache, resolve_device
    from finegrain.rewards.registry import SourceContext

    dev = resolve_device(device)
    models = models or ModelCache(dev, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        where = tokenizer or policy or reference
        if where is None:
            raise ConfigError("token credit needs the policy tokenizer: pass --tokenizer_name_or_path, --policy or "
                              "--reference")
        tokenizer = models.tokenizer(str(where))
    examples = load_credit_examples(data, tokenizer, split=split, max_rows=max_rows, unit=unit)
    context = SourceContext(tokenizer=tokenizer, device=dev, load_model=models.model, reference=reference,
                            policy=policy, contrastive_template=contrastive_template)
    resolved = resolve_credit_sources(sources, context)
    if not resolved:
        raise ConfigError("no token-credit source given")
    result = score_token_credit(resolved, examples, tokenizer, batch_size=batch_size, device=dev,
                                num_examples=num_examples)
    result["data"] = str(data) if isinstance(data, (str, Path)) else type(data).__name__
    if output_dir is not None:
        write_text(Path(output_dir) / "token_credit.json", json.dumps(result, indent=1, allow_nan=False))
        mark_eval_dir(Path(output_dir))
    if not quiet:
        print(format_token_credit(result, None if output_dir is None else Path(output_dir) / "token_credit.json"))
    return result


def format_token_credit(result: Mapping[str, Any], path: Path | None = None) -> str:
    """A readable table of a ``token_credit.json`` content: one line per source."""
    lines = [f"token credit on {result.get('num_responses')} responses ({result.get('n_pos')} positive, "
             f"{result.get('n_neg')} negative, {result.get('n_neutral')} neutral tokens)",
             f"  {'source':<24} {'AUROC':>7} {'P@k':>7}"]
    for name, value in result["auroc"].items():
        p = result.get("precision_at_k", {}).get(name)
        lines.append(f"  {name:<24} {format_number(value):>7} {format_number(p):>7}")
    if path is not None:
        lines.append(f"wrote {path}")
    return "\n".join(lines)


def format_number(x: float | None, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals, ``n/a`` for None (the tables of ``finegrain eval``)."""
    return "n/a" if x is None else f"{x:.{digits}f}"
