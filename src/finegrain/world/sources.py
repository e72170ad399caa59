"""The world's reward sources: its oracle as a rule reward, registered under the kind ``oracle``.

* ``oracle``: :func:`finegrain.world.oracle.judge`'s score on the response's last valid token (EOS when it has
  one), the usual sequence-level baseline;
* ``oracle:credit``: the ground-truth credit of every word on the token that completes the word (with the world's
  word-level tokenizer, token ``i`` is word ``i``; EOS gets 0). The credits sum to the score, so both give every
  response the same return ``Σ_t r_t``; only *where* the reward lands differs -- the dense mode is the upper bound of
  what fine-grained credit can give.

Both report ``well_formed`` per row in ``meta["metrics"]`` and the score in ``meta["score"]``, which evaluations
(``finegrain eval --judge oracle``, ``ppo --judge oracle``) read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from finegrain.errors import ConfigError, DataError
from finegrain.rewards.base import prompt_as_text
from finegrain.rewards.registry import SourceContext, register_reward_source
from finegrain.rewards.rule import JudgedRewardSource, word_end_tokens
from finegrain.world.oracle import DEFAULT_RULES, OracleRules, judge

__all__ = ["ORACLE_MODES", "OracleRewardSource", "register"]

ORACLE_MODES = {None: False, "sequence": False, "credit": True}
"""``oracle[:MODE]``: whether the mode is dense (per-word credit)."""


class OracleRewardSource(JudgedRewardSource):
    """The built-in world's oracle as a rule reward (see the module docstring).

    Args:
        tokenizer: the policy's tokenizer (decodes prompts and responses).
        dense: False -- the oracle score on the last valid token; True -- each word's ground-truth credit on the
            token that completes the word.
        rules: the world's :class:`finegrain.world.oracle.OracleRules` (default: the default world's).
        name: the source name in metrics and errors (default ``"oracle"`` / ``"oracle_credit"``).

    ``token_rewards(batch)`` (:class:`~finegrain.rewards.rule.JudgedRewardSource`) returns ``TokenRewards`` with
    ``meta["score"]`` ``(B,)`` (oracle scores), ``meta["metrics"]["well_formed"]`` ``(B,)`` bool and
    ``meta["responses"]`` (the texts).
    """

    def __init__(self, tokenizer: Any, *, dense: bool = False, rules: Any = None, name: str | None = None):
        self.tokenizer = tokenizer
        self.dense = dense
        self.rules = rules or DEFAULT_RULES
        self.name = name or ("oracle_credit" if dense else "oracle")

    def judge(self, prompts: Sequence[Any], responses: Sequence[str]) -> list:
        """:func:`finegrain.world.oracle.judge` of each (prompt, response); a prompt without a world topic is an error."""
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            try:
                out.append(judge(prompt_as_text(p), r, self.rules))
            except ValueError as exc:  # the prompt names no topic: not a world prompt
                raise DataError(f"reward source '{self.name}' judges world prompts only: {exc}", row=i) from None
        return out

    def score(self, judgement) -> float:
        return judgement.score

    def metrics(self, judgements: list) -> dict[str, torch.Tensor]:
        return {"well_formed": torch.tensor([j.well_formed for j in judgements], dtype=torch.bool)}

    def credit_row(self, token_ids: list[int], text: str, judgement) -> list[float]:
        """Each word's credit on the token that completes it."""
        values = [0.0] * len(token_ids)
        for word, token in enumerate(word_end_tokens(self.tokenizer, token_ids, text)):
            values[token] += judgement.credit[word]
        return values


def register(world_dir: str | Path | None = None) -> None:
    """Register ``oracle[:sequence|credit]`` (and the old name ``oracle_credit``) with the rules of ``world_dir``
    (the default world's when None or not built)."""

    def rules() -> OracleRules:
        from finegrain.world import is_built, load_world_config

        return load_world_config(world_dir).rules if world_dir and is_built(world_dir) else DEFAULT_RULES

    def make(arg: str | None, context: SourceContext) -> OracleRewardSource:
        if arg not in ORACLE_MODES:
            raise ConfigError(f"reward source 'oracle:{arg}': the oracle's modes are oracle, oracle:sequence "
                              "and oracle:credit")
        return OracleRewardSource(context.tokenizer, dense=ORACLE_MODES[arg], rules=rules())

    register_reward_source("oracle", make, "oracle[:credit], the built-in world's score (or its per-word credit)")
    register_reward_source("oracle_credit", lambda arg, ctx: make("credit", ctx),
                           "the built-in world's per-word credit (same as oracle:credit)")
