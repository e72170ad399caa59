"""The task's judge and rewards as reward sources, registered under the kind ``ifeval`` (docs/ifeval.md, "As a judge
and a reward", gives the modes' table and the reasons for the credit's design).

IFEval's checkers (Zhou et al. 2023, arXiv 2311.07911) judge each response against the instructions read back from
its prompt's text (:func:`finegrain.ifeval.instructions.parse_instructions`: a source sees only prompts and
responses). Three modes: ``ifeval`` (= ``ifeval:score``, the fraction of instructions followed, strict) and
``ifeval:pass`` (1 when all are followed, else 0) on the last valid response token (EOS when it has one);
``ifeval:credit``, the same return as ``ifeval:score`` placed by the token truth (:mod:`finegrain.ifeval.truth`),
the analogue of the world's ``oracle:credit``. With ``K`` instructions, each worth ``1/K``: a failed token-local
instruction located on ``n`` tokens of the policy's tokenization puts ``-1/(K n)`` on each of them (a token that
violates two gets both shares); the last valid token carries ``1 - u/K``, ``u`` the failed instructions without a
located violation (the content instructions, the case checkers' English test); every other token gets 0. So
``Σ_t r_t`` equals the ``ifeval:score`` of every response.

Every mode reports the score in ``meta["score"]`` and per-row judgements in ``meta["metrics"]``
(:func:`finegrain.rewards.base.sequence_scores`, :func:`~finegrain.rewards.base.row_metrics`, which ``finegrain eval
--judge`` and ``ppo --judge`` read): ``prompt_strict`` / ``prompt_loose`` (every instruction followed, strict or on
IFEval's relaxed variants) and ``instruction_strict`` / ``instruction_loose`` (the row's fraction followed, not
IFEval's pooled accuracy: docs/ifeval.md).

:func:`register` adds the kind to :mod:`finegrain.rewards.registry`; it imports neither a model nor the checkers
(``if-verifiable`` is imported when a source first judges).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from finegrain.errors import ConfigError, DataError
from finegrain.rewards.registry import SourceContext, register_reward_source
from finegrain.rewards.rule import JudgedRewardSource

__all__ = ["MODES", "IFEvalRewardSource", "Judgement", "register"]

MODES: dict[str | None, str] = {None: "score", "score": "score", "pass": "pass", "credit": "credit"}
"""``ifeval[:MODE]`` -> the mode."""


@functools.lru_cache(maxsize=4096)
def _instructions(text: str) -> tuple[list[str], list[dict]]:
    """:func:`~finegrain.ifeval.instructions.parse_instructions` of a prompt text, cached (callers get copies)."""
    from finegrain.ifeval.instructions import parse_instructions

    return parse_instructions(text)


@dataclass(slots=True)
class Judgement:
    """The checkers' verdicts on one response: ``ids``, ``kwargs``, ``strict`` and ``loose`` (one bool per
    instruction)."""

    ids: list[str]
    kwargs: list[dict]
    strict: list[bool]
    loose: list[bool]

    @property
    def score(self) -> float:
        """The fraction of instructions followed (strict)."""
        return sum(self.strict) / len(self.strict)

    @property
    def passed(self) -> bool:
        """Every instruction followed (strict)."""
        return all(self.strict)


class IFEvalRewardSource(JudgedRewardSource):
    """IFEval's checkers as a reward source (see the module docstring).

    Args:
        tokenizer: the policy's tokenizer (decodes prompts and responses when the batch does not carry them, and
            maps violations to tokens in ``credit`` mode).
        mode: ``"score"``, ``"pass"`` or ``"credit"``.
        loose: also judge IFEval's relaxed variants (the ``*_loose`` metrics; 8 checker calls per instruction
            instead of 1).
        name: the source name in metrics and errors (default ``ifeval``, ``ifeval_pass``, ``ifeval_credit``).

    ``token_rewards(batch)`` returns ``TokenRewards`` with ``values (B, T)``, ``mask = completion_mask``,
    ``meta["score"] (B,)`` (the mode's sequence score), ``meta["metrics"]`` (``prompt_strict``,
    ``instruction_strict`` and, with ``loose``, ``prompt_loose``, ``instruction_loose``; ``(B,)`` each) and
    ``meta["responses"]``.
    """

    def __init__(self, tokenizer: Any, mode: str = "score", *, loose: bool = True, name: str | None = None):
        if mode not in ("score", "pass", "credit"):
            raise ConfigError(f"IFEval reward mode {mode!r}: the modes are score, pass and credit")
        self.tokenizer = tokenizer
        self.mode = mode
        self.dense = mode == "credit"
        self.loose = loose
        self.name = name or ("ifeval" if mode == "score" else f"ifeval_{mode}")

    def judge(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[Judgement]:
        """The checkers' verdicts on each (prompt, response); a prompt without the task's instructions is a
        :class:`~finegrain.errors.DataError` naming its row."""
        from finegrain.ifeval.instructions import check_instructions
        from finegrain.ifeval.score import prompt_content

        out = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                ids, kwargs = copy.deepcopy(_instructions(prompt_content(prompt, row=i)))
            except DataError as err:
                raise DataError(f"reward source '{self.name}' judges the IFEval task's prompts only: {err.reason}",
                                row=i, field="prompt") from None
            strict = check_instructions(response, ids, kwargs)
            loose = check_instructions(response, ids, kwargs, loose=True) if self.loose else strict
            out.append(Judgement(ids, kwargs, strict, loose))
        return out

    def score(self, judgement: Judgement) -> float:
        return float(judgement.passed) if self.mode == "pass" else judgement.score

    def metrics(self, judgements: list[Judgement]) -> dict[str, torch.Tensor]:
        metrics = {
            "prompt_strict": torch.tensor([j.passed for j in judgements], dtype=torch.bool),
            "instruction_strict": torch.tensor([j.score for j in judgements], dtype=torch.float32),
        }
        if self.loose:
            metrics["prompt_loose"] = torch.tensor([all(j.loose) for j in judgements], dtype=torch.bool)
            metrics["instruction_loose"] = torch.tensor([sum(j.loose) / len(j.loose) for j in judgements],
                                                        dtype=torch.float32)
        return metrics

    def credit_row(self, token_ids: list[int], text: str, j: Judgement) -> list[float]:
        """Per-token credit of one response (module docstring), on the tokens ``token_ids`` (EOS included)."""
        from finegrain.ifeval.instructions import TOKEN_LOCAL
        from finegrain.ifeval.truth import Violation, token_truth, violations
        from finegrain.rewards.models import decode_with_offsets

        k = len(j.ids)
        values = [0.0] * len(token_ids)
        if not token_ids:
            return values
        text, offsets = decode_with_offsets(self.tokenizer, token_ids)
        lead = len(text) - len(text.lstrip())
        response = text.strip()  # what the checkers judged: the decoded response, stripped
        unlocated = 0
        for instruction_id, args, followed in zip(j.ids, j.kwargs, j.strict):
            if followed:
                continue
            tokens: list[int] = []
            if instruction_id in TOKEN_LOCAL:
                found = [Violation(v.start + lead, v.end + lead, instruction_id)
                         for v in violations(response, [instruction_id], [args])]
                tokens = [t for t, label in enumerate(token_truth(text, offsets, found)) if label == -1]
            if not tokens:
                unlocated += 1
                continue
            for t in tokens:
                values[t] -= 1.0 / (k * len(tokens))
        values[-1] += 1.0 - unlocated / k
        return values


def _make(arg: str | None, context: SourceContext) -> IFEvalRewardSource:
    if arg not in MODES:
        raise ConfigError(f"reward source 'ifeval:{arg}': the IFEval task's modes are ifeval (= ifeval:score, the "
                          "fraction of instructions followed), ifeval:pass (1 if all are followed) and ifeval:credit "
                          "(the score placed on the violating tokens; docs/ifeval.md)")
    return IFEvalRewardSource(context.tokenizer, MODES[arg])


def register() -> None:
    """Register ``ifeval[:score|pass|credit]`` in the reward registry (cheap: nothing is loaded until a source is
    built)."""
    register_reward_source("ifeval", _make, "ifeval[:pass|credit], the IFEval task's checkers: the fraction of "
                                            "instructions followed, 1 if all are, or that score on the violating "
                                            "tokens (docs/ifeval.md)")
