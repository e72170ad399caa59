"""IFEval accuracies of responses, and the checkers as a reward.

:func:`score_responses` is IFEval's evaluation (Zhou et al. 2023, arXiv 2311.07911, section 2.2) as a pure function
of prompt rows and responses:

* prompt-level strict accuracy: the fraction of responses that follow *every* instruction of their prompt;
* instruction-level strict accuracy: the fraction of (response, instruction) pairs followed;
* the same two *loose* (each instruction judged on IFEval's relaxed variants of the response, see
  :func:`finegrain.ifeval.instructions.loose_variants`);
* per instruction id, the strict and loose fraction followed and how often it occurs;
* the mean response length in words (IFEval's ``count_words``: runs of ``\\w``), the guard against a policy that
  wins "no commas" by saying nothing -- every prompt also asks for at least N words and a keyword;
* ``unasked``: for the instructions a response can follow by habit (:data:`UNASKED`: no commas, all lowercase, all
  capitals), how often it follows them where its prompt did *not* ask -- the guard against a policy that wins them
  by writing that way always. A policy that follows instructions keeps these near the start model's rates.

:func:`reward` and :func:`reward_all` are the checkers as a reward function for ``finegrain ppo --reward
python:finegrain.ifeval.score:reward`` (:class:`finegrain.rewards.FunctionRewardSource`): ``f(prompts, responses) ->
list[float]``, one sequence score per response. A reward function receives only the prompts, so it reads the
instructions back from the prompt's text (:func:`finegrain.ifeval.instructions.parse_instructions`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finegrain.errors import DataError
from finegrain.ifeval.instructions import check_instructions, parse_instructions

__all__ = ["UNASKED", "IFEvalScores", "count_words", "prompt_content", "reward", "reward_all", "score_responses"]

UNASKED = ("punctuation:no_comma", "change_case:english_lowercase", "change_case:english_capital")
"""Instructions without arguments that a response can follow whatever its prompt asks (``unasked`` rates)."""


def count_words(text: str) -> int:
    """Words as IFEval counts them (``nltk``'s ``RegexpTokenizer(r"\\w+")``: runs of word characters).

    Example:
        >>> count_words("it's a well-known fact, 42.")
        7
    """
    return len(re.findall(r"\w+", text))


def prompt_content(prompt: Any, *, source: str | None = None, row: int | None = None) -> str:
    """The prompt as IFEval's string: itself, or the content of the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        users = [m.get("content") for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    raise DataError(f"a prompt must be a string or a list of chat messages with a user message, got {prompt!r:.80}",
                    source=source, row=row, field="prompt")


@dataclass
class IFEvalScores:
    """IFEval's accuracies over ``n`` responses (see the module docstring); fractions in [0, 1]."""

    n: int
    prompt_strict: float
    instruction_strict: float
    prompt_loose: float
    instruction_loose: float
    mean_words: float
    per_instruction: dict[str, dict[str, float]] = field(default_factory=dict)
    unasked: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per :data:`UNASKED` id: ``rate``, the fraction of responses to prompts *without* it that follow it anyway
    (strict), over ``count`` such responses."""
    followed_strict: list[list[bool]] = field(default_factory=list, repr=False)


def _instructions(row: Mapping[str, Any], i: int, source: str | None) -> tuple[list[str], list[dict]]:
    ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
    if not isinstance(ids, list) or not ids:
        raise DataError("missing or empty instruction_id_list", source=source, row=i, field="instruction_id_list")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise DataError(f"kwargs must be a list of {len(ids)} dicts, one per instruction", source=source, row=i,
                        field="kwargs")
    return ids, [dict(k or {}) for k in kwargs]


def score_responses(rows: Sequence[Mapping[str, Any]], responses: Sequence[str], *,
                    source: str | None = None) -> IFEvalScores:
    """IFEval's prompt- and instruction-level accuracies of ``responses[i]`` to ``rows[i]``.

    Args:
        rows: prompt rows with ``instruction_id_list`` and ``kwargs`` (IFEval's input format); a prompt with ``k``
            responses appears ``k`` times.
        responses: one response text per row.
        source: file name for error messages.

    Returns:
        :class:`IFEvalScores`; ``followed_strict[i]`` holds row ``i``'s verdict per instruction.

    Raises:
        DataError: a row without instructions or with mismatched kwargs, a response that is not a string, or
            ``len(rows) != len(responses)``.
    """
    if len(rows) != len(responses):
        raise DataError(f"{len(rows)} prompt rows but {len(responses)} responses", source=source)
    if not rows:
        raise DataError("no rows to score", source=source)
    per: dict[str, list[int]] = {}
    unasked: dict[str, list[int]] = {}
    followed: list[list[bool]] = []
    followed_loose: list[list[bool]] = []
    for i, (row, response) in enumerate(zip(rows, responses)):
        if not isinstance(response, str):
            raise DataError(f"response is {type(response).__name__}, not a string", source=source, row=i,
                            field="response")
        ids, kwargs = _instructions(row, i, source)
        try:
            strict = check_instructions(response, ids, kwargs)
            loose = check_instructions(response, ids, kwargs, loose=True)
        except DataError as err:
            raise DataError(err.reason, source=source, row=i, field=err.field) from err
        followed.append(strict)
        followed_loose.append(loose)
        for instruction_id, s, lo in zip(ids, strict, loose):
            counts = per.setdefault(instruction_id, [0, 0, 0])
            counts[0] += s
            counts[1] += lo
            counts[2] += 1
        not_asked = [k for k in UNASKED if k not in ids]
        for instruction_id, s in zip(not_asked, check_instructions(response, not_asked, [{}] * len(not_asked))):
            counts = unasked.setdefault(instruction_id, [0, 0])
            counts[0] += s
            counts[1] += 1
    n, total_instr = len(rows), sum(map(len, followed))
    return IFEvalScores(
        n=n, prompt_strict=sum(map(all, followed)) / n, instruction_strict=sum(map(sum, followed)) / total_instr,
        prompt_loose=sum(map(all, followed_loose)) / n, instruction_loose=sum(map(sum, followed_loose)) / total_instr,
        mean_words=sum(map(count_words, responses)) / n,
        per_instruction={k: {"strict": v[0] / v[2], "loose": v[1] / v[2], "count": v[2]} for k, v in sorted(per.items())},
        unasked={k: {"rate": v[0] / v[1], "count": v[1]} for k, v in unasked.items()},
        followed_strict=followed,
    )


def _verdicts(prompts: Sequence[Any], responses: Sequence[str]) -> list[list[bool]]:
    if len(prompts) != len(responses):
        raise DataError(f"{len(prompts)} prompts but {len(responses)} responses")
    out = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids, kwargs = parse_instructions(prompt_content(prompt, row=i), row=i)
        out.append(check_instructions(response, ids, kwargs))
    return out


def reward(prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """The fraction of its prompt's instructions each response follows (strict): a dense-ish sequence reward.

    Example:
        >>> reward(['Say hi. Do not use any commas in your response. Answer with at least 2 words.'],
        ...        ['hi there, friend'])
        [0.5]
    """
    return [sum(v) / len(v) for v in _verdicts(prompts, responses)]


def reward_all(prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """1.0 when a response follows every instruction of its prompt (IFEval's prompt-level strict), else 0.0."""
    return [float(all(v)) for v in _verdicts(prompts, responses)]
