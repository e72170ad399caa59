"""Token-credit evaluation: how well each reward source ranks response tokens by their ground-truth credit.

Given responses whose tokens carry ground-truth credit and one or more reward sources, every source scores the
same responses in the policy's tokenization (:meth:`~finegrain.rewards.RewardSource.token_rewards`), and
:func:`finegrain.eval.metrics.evaluate_token_credit` ranks its per-token rewards against the truth, pooled over all
responses: AUROC of positive-credit versus negative-credit tokens (neutral tokens left out) and precision@k. The
result is the run directory's ``token_credit.json`` (docs/run-directory.md), whose examples are drawn as heatmaps by
``finegrain report``.

Ground truth (one of, by the data set's columns):

* ``{prompt, response, words, credit}``: per-word credit, as the built-in world writes ``data/credit_test.jsonl``.
  Words are located in the response text in order, and each policy token takes the credit of the word its
  character offsets overlap most (:func:`word_credit_to_tokens`); tokens that overlap no word (EOS, whitespace)
  are neutral. With the world's tokenizer token ``i`` is word ``i``.
* ``{prompt, response, labels | spans}``: token supervision rows (``finegrain label edits`` output, TRL-style):
  ``labels`` per token of this tokenizer, or character ``spans`` mapped through the offsets.
* ``{prompt, rejected, revised}``: revision rows; each gives two responses labelled by edit alignment
  (:func:`finegrain.data.alignment.edit_token_labels`): changed tokens of the rejected response -1, changed tokens
  of the revision +1, everything else neutral.

Sources (:func:`resolve_credit_sources`; ``NAME=SPEC`` names a source):

* ``oracle-credit``: the truth itself (a sanity check: AUROC 1);
* ``contrastive``: contrastive prompting (T-REG) with the reference model;
* ``implicit`` / ``implicit:<policy_dir>``: the implicit reward ``β (log π − log π_ref)`` per token of a
  preference-trained policy (``β (ρ_t + K_t)`` for a TDPO run);
* a reward-model directory, loaded by :func:`finegrain.rewards.registry.load_reward_source`;
* in Python, any object with ``token_rewards(batch) -> TokenRewards``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
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
    spans = []
    cursor = 0
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


def _as_sft(items: list[dict], field: str) -> list[dict]:
    """Validated rows as ``sft`` rows whose completion is ``item[field]`` (source and row kept)."""
    return [{"prompt": it["prompt"], "completion": it[field], "conversational": it["conversational"],
             "source": it["source"], "row": it["row"]} for it in items]


def _example(tok_row: dict, truth: list[float]) -> CreditExample:
    return CreditExample(
        prompt=tok_row["prompt"], prompt_input_ids=list(tok_row["prompt_input_ids"]),
        text=tok_row["completion_text"], input_ids=list(tok_row["completion_input_ids"]),
        offsets=[tuple(o) for o in tok_row["completion_offsets"]], truth=[float(v) for v in truth],
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

    The three row formats are in the module docstring. Prompts and responses are tokenized as the data layer does
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

    if kind == "revision":
        valid = validate_rows(rows, "revision")
        rejected = tokenize_rows(_as_sft(valid, "rejected"), tokenizer, "sft", limits)
        revised = tokenize_rows(_as_sft(valid, "revised"), tokenizer, "sft", limits)
        out = []
        for rej, rev in zip(rejected, revised):
            try:
                labels = edit_token_labels(rej["completion_text"], rev["completion_text"], rej["completion_offsets"],
                                           rev["completion_offsets"], unit=unit,
                                           rejected_ids=rej["completion_input_ids"],
                                           revised_ids=rev["completion_input_ids"])
            except DataError as err:
                raise DataError(err.reason, source=rej["source"], row=rej["row"], field=err.field) from err
            out += [_example(rej, labels.rejected_labels), _example(rev, labels.revised_labels)]
        return out

    # Word credit: validate prompt and response as an sft row (the response is the completion), then map words.
    for name in ("prompt", "response"):
        if name not in rows.column_names:
            raise DataError(f"missing column '{name}'; word-credit rows need prompt, response, words, credit",
                            source=rows.source, field=name)
    as_sft = [{"prompt": r.get("prompt"), "completion": r.get("response")} for r in rows]
    try:
        valid = validate_rows(load_rows(as_sft, source_name=rows.source), "sft")
    except DataError as err:
        field = "response" if err.field == "completion" else err.field
        src, row = rows.locate(err.row) if err.row is not None else (err.source, None)
        raise DataError(err.reason, source=src, row=row, field=field) from err
    for i, item in enumerate(valid):
        item["source"], item["row"] = rows.locate(i)
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


@dataclass
class _Scorer:
    """A named source and how to call it on a batch of examples (some sources need the raw prompts)."""

    name: str
    call: Callable[[CompletionBatch, list[CreditExample]], TokenRewards]


def _from_reward_source(name: str, source: Any) -> _Scorer:
    if not callable(getattr(source, "token_rewards", None)):
        raise ConfigError(f"token-credit source '{name}' has no token_rewards(batch) method")
    return _Scorer(name, lambda batch, examples: source.token_rewards(batch))


def _oracle_scorer(name: str = ORACLE_CREDIT) -> _Scorer:
    def call(batch: CompletionBatch, examples: list[CreditExample]) -> TokenRewards:
        values = torch.zeros(batch.completion_input_ids.shape, dtype=torch.float32)
        for i, ex in enumerate(examples):
            values[i, : len(ex.truth)] = torch.tensor(ex.truth, dtype=torch.float32)
        mask = batch.completion_mask.to(torch.bool)
        return TokenRewards(values=values.to(mask.device) * mask, mask=mask)

    return _Scorer(name, call)


def _contrastive_scorer(name: str, reference, tokenizer, on_world: bool, chunk_rows: int) -> _Scorer:
    """Contrastive prompting with the reference: the shared reward source when present, else the pure maths."""
    try:
        from finegrain.rewards.contrastive import ContrastiveRewardSource, resolve_template
    except ImportError:
        ContrastiveRewardSource = None  # noqa: N806
    if ContrastiveRewardSource is not None:
        source = ContrastiveRewardSource(reference, tokenizer, resolve_template("auto", on_world=on_world))
        return _Scorer(name, lambda batch, examples: source.token_rewards(batch, prompts=[e.prompt for e in examples]))
    if not on_world:
        raise ConfigError("contrastive prompting on your own data needs prompt templates "
                          "(finegrain.rewards.contrastive.ContrastiveRewardSource), which this installation lacks")

    from finegrain.data.collate import collate_completions, pad_token_id
    from finegrain.data.tokenize import tokenize_prompt
    from finegrain.rewards.contrastive import contrastive_token_rewards
    from finegrain.rl.rollout import score_rollout
    from finegrain.world.corpus import control_prompts

    def call(batch: CompletionBatch, examples: list[CreditExample]) -> TokenRewards:
        logps = []
        for sign in (0, 1):  # P+ then P-, each read by the reference before the same response ids
            prompts = [tokenize_prompt(tokenizer, control_prompts(e.prompt)[sign]) for e in examples]
            block = collate_completions([{"prompt_input_ids": p, "completion_input_ids": e.input_ids}
                                         for p, e in zip(prompts, examples)], pad_token_id(tokenizer))
            logps.append(score_rollout(reference, block.to(batch.completion_input_ids.device),
                                       chunk_rows=chunk_rows)["token_logps"])
        mask = batch.completion_mask.to(torch.bool)
        return TokenRewards(values=contrastive_token_rewards(logps[0], logps[1], mask), mask=mask)

    return _Scorer(name, call)


def _implicit_scorer(name: str, policy, reference, beta: float, kind: str, chunk_rows: int) -> _Scorer:
    """Implicit rewards: the shared reward source when present, else ``β ρ_t`` from two forwards (DPO only)."""
    try:
        from finegrain.rewards.implicit import ImplicitRewardSource
    except ImportError:
        ImplicitRewardSource = None  # noqa: N806
    if ImplicitRewardSource is not None:
        source = ImplicitRewardSource(policy, beta, ref_model=reference, kind=kind)
        return _Scorer(name, lambda batch, examples: source.token_rewards(batch))
    if kind != "dpo":
        raise ConfigError(f"implicit {kind} rewards need finegrain.rewards.implicit, which this installation lacks")

    from finegrain.rewards.contrastive import implicit_token_rewards
    from finegrain.rl.rollout import score_rollout

    def call(batch: CompletionBatch, examples: list[CreditExample]) -> TokenRewards:
        s = score_rollout(policy, batch, ref_model=reference, chunk_rows=chunk_rows)
        mask = batch.completion_mask.to(torch.bool)
        return TokenRewards(values=implicit_token_rewards(s["token_logps"], s["ref_token_logps"], mask, beta),
                            mask=mask)

    return _Scorer(name, call)


def _run_info(policy_dir: Path) -> tuple[str | None, float | None]:
    """``(method, beta)`` of the run a policy directory belongs to (``RUN/final`` -> RUN's run.json, config.yaml)."""
    import yaml

    method = beta = None
    for run in (policy_dir.parent, policy_dir):
        if method is None and (run / "run.json").is_file():
            try:
                method = json.loads((run / "run.json").read_text()).get("method")
            except (OSError, ValueError):
                pass
        if beta is None and (run / "config.yaml").is_file():
            try:
                value = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("beta")
            except (OSError, yaml.YAMLError):
                value = None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                beta = float(value)
    return method, beta


def _registered_names() -> list[str]:
    """Names the reward-source registry knows (none when the registry is not installed)."""
    try:
        from finegrain.rewards.registry import registered_sources
    except ImportError:
        return []
    return registered_sources()


def _source_label(spec: str, source: Any) -> str:
    """A reward model's row label: its run's directory name (``runs/rm-token/final`` -> ``rm-token``), else the
    source's own name."""
    path = Path(spec)
    if path.is_dir():
        return (path.parent.name if path.name == "final" else path.name) or str(getattr(source, "name", spec))
    return str(getattr(source, "name", None) or spec)


def _split_name(spec: str) -> tuple[str | None, str]:
    """``NAME=SPEC`` -> ``(NAME, SPEC)``; a spec without ``=`` (or a path that exists) has no name."""
    if "=" in spec and not Path(spec).exists():
        name, _, rest = spec.partition("=")
        if name and rest:
            return name, rest
    return None, spec


def _unique(name: str, taken: Mapping[str, Any]) -> str:
    if name not in taken and name != "truth":
        return name
    k = 2
    while f"{name}#{k}" in taken:
        k += 1
    return f"{name}#{k}"


def resolve_credit_sources(
    specs: Sequence[Any] | Mapping[str, Any],
    *,
    load_model: Callable[[str], Any],
    tokenizer: Any,
    policy: str | None = None,
    reference: str | None = None,
    on_world: bool = True,
    world_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    chunk_rows: int = 8,
) -> dict[str, _Scorer]:
    """Turn source specs (module docstring) into named scorers.

    Args:
        specs: spec strings (``oracle-credit``, ``contrastive``, ``implicit``, ``implicit:DIR``, a reward-model
            directory, each optionally ``NAME=SPEC``) or reward-source objects; or a mapping name -> spec / object.
        load_model: ``path -> causal LM`` on the right device in eval mode (models are shared between sources).
        tokenizer: the policy tokenizer.
        policy: the policy directory that bare ``implicit`` refers to.
        reference: the reference model directory (contrastive prompting, implicit rewards).
        on_world: whether the models and data are the built-in world's (templates, error messages).
        world_dir: the world directory, passed to the reward-model registry.
        device: where reward models run.
        chunk_rows: rows per forward pass in the fallback implementations.

    Returns:
        An ordered mapping name -> scorer.

    Raises:
        ConfigError: an unknown spec, a missing directory, or a source that needs a model nobody named.
    """
    from finegrain.models.loading import model_dir

    items = list(specs.items()) if isinstance(specs, Mapping) else [(None, s) for s in specs]
    out: dict[str, _Scorer] = {}
    for given_name, spec in items:
        if not isinstance(spec, str):
            name = given_name or getattr(spec, "name", None) or type(spec).__name__
            out[_unique(str(name), out)] = _from_reward_source(str(name), spec)
            continue
        name, spec = (given_name, spec) if given_name else _split_name(spec)
        if spec == ORACLE_CREDIT:
            scorer = _oracle_scorer()
        elif spec == "contrastive":
            if reference is None:
                raise ConfigError("the contrastive source needs a reference model: pass --reference")
            scorer = _contrastive_scorer("contrastive", load_model(reference), tokenizer, on_world, chunk_rows)
        elif spec == "implicit" or spec.startswith("implicit:"):
            target = spec.partition(":")[2] or policy
            target = model_dir(target) if target else target
            if not target:
                raise ConfigError("the 'implicit' source needs a policy: pass --policy or write implicit:<policy_dir>")
            if reference is None:
                raise ConfigError("implicit rewards need the reference model: pass --reference")
            if not Path(target).is_dir():
                raise ConfigError(f"implicit:{target}: no such model directory")
            method, beta = _run_info(Path(target))
            if beta is None:
                beta = 1.0
                print(f"token credit: no beta in the config of {target}; implicit rewards use beta = 1 "
                      "(AUROC does not depend on it)", file=sys.stderr)
            kind = "tdpo" if method and method.lower().startswith("tdpo") else "dpo"
            scorer = _implicit_scorer(f"implicit_{method}" if method else "implicit", load_model(target),
                                      load_model(reference), beta, kind, chunk_rows)
        elif Path(spec).is_dir() or spec in _registered_names():
            try:
                from finegrain.rewards.registry import load_reward_source
            except ImportError:
                raise ConfigError(
                    f"{spec}: reward-model directories are loaded by finegrain.rewards.registry, which this "
                    "installation lacks"
                ) from None
            source = load_reward_source(spec, policy_tokenizer=tokenizer, device=device, world_dir=world_dir)
            if getattr(source, "spread", True) is False:
                # a sentence RM places each sentence's term on its last token (right for PPO); credit is judged per
                # word, so here each term is spread over its sentence's tokens, as finegrain rm's own evaluation does
                source.spread = True
            scorer = _from_reward_source(_source_label(spec, source), source)
        else:
            raise ConfigError(
                f"unknown token-credit source {spec!r}: use oracle-credit, contrastive, implicit, implicit:<policy_dir>, "
                "a reward-model directory or a registered reward source (optionally NAME=SPEC)"
            )
        scorer.name = _unique(name or scorer.name, out)
        out[scorer.name] = scorer
    return out


# ------------------------------------------------------------------------------------------------ scoring


def _token_texts(example: CreditExample, tokenizer: Any) -> list[str]:
    """The text of each response token: its slice of the response, or the token's name when it has none (EOS)."""
    names = tokenizer.convert_ids_to_tokens(example.input_ids) if tokenizer is not None else None
    out = []
    for j, (s, e) in enumerate(example.offsets):
        if e > s:
            out.append(example.text[s:e])
        else:
            out.append(str(names[j]) if names is not None else "")
    return out


def _score_rows(scorer: _Scorer, examples: list[CreditExample], pad_id: int, batch_size: int,
                device: str | torch.device) -> list[np.ndarray]:
    from finegrain.data.collate import collate_completions
    from finegrain.rewards.base import check_finite

    out: list[np.ndarray] = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        batch = collate_completions(
            [{"prompt_input_ids": e.prompt_input_ids, "completion_input_ids": e.input_ids} for e in chunk], pad_id
        ).to(device)
        with torch.no_grad():
            rewards = scorer.call(batch, chunk)
        if tuple(rewards.values.shape) != tuple(batch.completion_input_ids.shape):
            raise ValueError(f"token-credit source '{scorer.name}' returned values of shape "
                             f"{tuple(rewards.values.shape)} for a batch of {tuple(batch.completion_input_ids.shape)}")
        check_finite(rewards, scorer.name)
        values = torch.where(rewards.mask.to(torch.bool), rewards.values, torch.zeros_like(rewards.values))
        values = values.detach().to("cpu", torch.float64).numpy()
        out += [values[i, : len(e.input_ids)].copy() for i, e in enumerate(chunk)]
    return out


def _pick_examples(examples: list[CreditExample], k: int) -> list[int]:
    """Indices of ``k`` examples for the heatmaps: first those with both positive and negative truth."""
    both = [i for i, e in enumerate(examples) if any(v > 0 for v in e.truth) and any(v < 0 for v in e.truth)]
    chosen = set(both)
    rest = [i for i in range(len(examples)) if i not in chosen]
    return sorted((both + rest)[:k])


def _finite_or_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


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
        sources: name -> scorer from :func:`resolve_credit_sources`, or name -> object with
            ``token_rewards(batch)``.
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
    scorers = {name: s if isinstance(s, _Scorer) else _from_reward_source(name, s) for name, s in sources.items()}
    pad_id = pad_token_id(tokenizer)
    truth = [np.asarray(e.truth, dtype=np.float64) for e in examples]
    picked = _pick_examples(examples, num_examples)
    shown = [{"prompt": examples[i].prompt if isinstance(examples[i].prompt, str) else json.dumps(examples[i].prompt),
              "tokens": _token_texts(examples[i], tokenizer), "sources": {"truth": truth[i].tolist()}} for i in picked]
    result: dict[str, Any] = {"examples": shown, "auroc": {}, "precision_at_k": {}, "k": {}}
    counts = None
    for name, scorer in scorers.items():
        rows = _score_rows(scorer, examples, pad_id, batch_size, device)
        res = evaluate_token_credit(rows, truth, eps=eps)
        result["auroc"][name] = _finite_or_none(res.auroc)
        result["precision_at_k"][name] = _finite_or_none(res.precision_at_k)
        result["k"][name] = res.k
        counts = res
        for item, i in zip(shown, picked):
            item["sources"][name] = rows[i].tolist()
    if counts is None:
        counts = evaluate_token_credit(truth, truth, eps=eps)
    result.update(n_pos=counts.n_pos, n_neg=counts.n_neg, n_neutral=counts.n_neutral, num_responses=len(examples))
    return result


# ------------------------------------------------------------------------------------------------ entry point


def evaluate_token_credit_sources(
    sources: Sequence[Any] | Mapping[str, Any],
    *,
    data: Any = None,
    split: str | None = None,
    tokenizer: Any = None,
    policy: str | None = None,
    reference: str | None = None,
    world_dir: str | Path | None = None,
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
) -> dict[str, Any]:
    """Token-credit AUROC and precision@k of reward sources; writes ``token_credit.json`` when ``output_dir`` is set.

    With ``data`` None this runs on the built-in world: ground truth from ``<world>/data/credit_test.jsonl``, the
    world's SFT model as the default reference, its tokenizer as the default policy tokenizer.

    Args:
        sources: source specs or objects (see :func:`resolve_credit_sources`).
        data: the data set with ground truth (module docstring); None: the world's credit_test.jsonl.
        split: its split.
        tokenizer: the policy tokenizer (a loaded tokenizer or a path); default: the policy's, else the
            reference's, else the world's.
        policy: the policy directory bare ``implicit`` refers to.
        reference: the reference model directory; default: the world's SFT model when ``data`` is None.
        world_dir: where the built-in world lives (built on first use).
        output_dir: where ``token_credit.json`` goes (None: not written).
        max_rows: read only the first rows of ``data``.
        num_examples: responses written for the heatmaps.
        unit: alignment unit for revision rows.
        batch_size: responses per call of a source.
        device: ``"cpu"``, ``"cuda"``, ...; None picks CUDA when available.
        dtype: model dtype (``float32``, ``bfloat16``, ``float16``; None: as saved / float32).
        trust_remote_code: allow custom model code from the hub.
        quiet: do not print the table.
        models: a :class:`finegrain.eval.cli.ModelCache` to share loaded models with other calls.

    Returns:
        The content of ``token_credit.json`` (see :func:`score_token_credit`) plus ``data``.
    """
    from finegrain.eval.cli import ModelCache, mark_eval_dir, resolve_device

    dev = resolve_device(device)
    on_world = data is None
    world = None
    if on_world:
        from finegrain.world import ensure_world

        world = ensure_world(world_dir)
        data = str(world / "data" / "credit_test.jsonl")
        reference = reference or str(world / "sft")
    models = models or ModelCache(dev, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        where = tokenizer or policy or reference
        if where is None:
            raise ConfigError("token credit on your own data needs the policy tokenizer: pass --policy or --reference")
        tokenizer = models.tokenizer(str(where))
    examples = load_credit_examples(data, tokenizer, split=split, max_rows=max_rows, unit=unit)
    scorers = resolve_credit_sources(
        sources, load_model=models.model, tokenizer=tokenizer, policy=policy, reference=reference,
        on_world=on_world, world_dir=world if world is not None else world_dir, device=dev,
    )
    if not scorers:
        raise ConfigError("no token-credit source given")
    result = score_token_credit(scorers, examples, tokenizer, batch_size=batch_size, device=dev,
                                num_examples=num_examples)
    result["data"] = str(data) if isinstance(data, (str, Path)) else type(data).__name__
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "token_credit.json").write_text(json.dumps(result, indent=1, allow_nan=False))
        mark_eval_dir(out)
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
        lines.append(f"  {name:<24} {_fmt(value):>7} {_fmt(p):>7}")
    if path is not None:
        lines.append(f"wrote {path}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
