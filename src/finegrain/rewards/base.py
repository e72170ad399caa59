"""The reward-source interface: every source maps a batch to dense per-token rewards.

The contract (:class:`finegrain.types.TokenRewards`): ``values (B, T)`` aligned with the response tokens of the
policy's tokenization, exactly 0 where ``mask`` is False, plus an optional sequence score ``seq_reward (B,)``.
Sequence RMs, sentence RMs, token RMs, TLCR discriminators, contrastive prompting, implicit DPO rewards, rule
rewards and applications' own sources all implement :class:`RewardSource`, so any of them can feed any optimizer
(docs/reward-sources.md).

Sources that read text take it from the batch: :func:`prompt_texts` / :func:`response_texts` give the batch's
``prompts`` / ``responses`` when whoever built it set them, else decode its token blocks. A source may report
per-row judgements for evaluation in ``meta`` (:func:`sequence_scores`, :func:`row_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from finegrain.errors import NonFiniteError
from finegrain.ops.masked import zero_masked
from finegrain.types import CompletionBatch, TokenRewards


@runtime_checkable
class RewardSource(Protocol):
    """A source of dense token rewards.

    Attributes:
        name: a short identifier used in logs, metrics and error messages (e.g. ``"sentence_rm"``).

    Implementations take already-built models and tokenizers in their constructor (no I/O there) and return
    rewards in the response layout of the batch they were given.
    """

    name: str

    def token_rewards(self, batch: CompletionBatch) -> TokenRewards:
        """Rewards for the ``N`` rows of ``batch``: ``values (N, T)``, ``mask (N, T)``, optional ``seq_reward (N,)``."""
        ...


# --------------------------------------------------------------------------------------------- text of a batch


def _decode(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=True).strip()
            for row, m in zip(ids.cpu(), mask.to(torch.bool).cpu())]


def decode_responses(tokenizer: Any, batch: CompletionBatch) -> list[str]:
    """Response texts of ``batch`` (tokens under ``completion_mask``, special tokens such as EOS dropped, stripped)."""
    return _decode(tokenizer, batch.completion_input_ids, batch.completion_mask)


def _given_or_decoded(given: Sequence | None, what: str, batch: CompletionBatch, decode) -> list:
    if given is None:
        return decode()
    if len(given) != batch.num_rows:
        raise ValueError(f"batch has {len(given)} {what} for {batch.num_rows} rows")
    return list(given)


def prompt_texts(batch: CompletionBatch, tokenizer: Any) -> list[Any]:
    """The ``N`` prompts of ``batch``: ``batch.prompts`` as the data set gave them, else its decoded prompt
    block (real prompt tokens, special tokens and chat-template markers dropped, stripped)."""
    return _given_or_decoded(batch.prompts, "prompts", batch,
                             lambda: _decode(tokenizer, batch.prompt_input_ids, batch.prompt_attention_mask))


def response_texts(batch: CompletionBatch, tokenizer: Any) -> list[str]:
    """The ``N`` response texts of ``batch``: ``batch.responses``, else its decoded response block."""
    return _given_or_decoded(batch.responses, "responses", batch, lambda: decode_responses(tokenizer, batch))


def prompt_as_text(prompt: Any) -> str:
    """A prompt as one string: itself, or the content of the last user message of a conversation."""
    from finegrain.errors import DataError

    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[-1])
        if prompt and isinstance(prompt[-1], dict):
            return str(prompt[-1].get("content", ""))
    raise DataError(f"cannot read a prompt of type {type(prompt).__name__} as text")


# --------------------------------------------------------------------------------------------- judgements


def sequence_scores(rewards: TokenRewards) -> torch.Tensor:
    """One score per row ``(B,)``: ``meta["score"]`` when the source gives one (e.g. a rule judge), else
    ``seq_reward``, else the sum of ``values`` over the mask. What ``finegrain eval --judge`` compares.

    Example:
        >>> r = TokenRewards(values=torch.tensor([[1.0, 2.0, 5.0]]), mask=torch.tensor([[True, True, False]]))
        >>> sequence_scores(r)
        tensor([3.])
    """
    score = rewards.meta.get("score")
    if score is not None:
        return torch.as_tensor(score, dtype=torch.float32)
    if rewards.seq_reward is not None:
        return rewards.seq_reward.float()
    return zero_masked(rewards.values, rewards.mask).sum(-1).float()


def row_metrics(rewards: TokenRewards) -> dict[str, torch.Tensor]:
    """Per-row judgements a source reports besides its score, ``meta["metrics"]``: name -> ``(B,)`` numbers or
    booleans (e.g. the world oracle's ``well_formed``, IFEval's ``prompt_strict``). Evaluations average them."""
    return {k: torch.as_tensor(v).float() for k, v in (rewards.meta.get("metrics") or {}).items()}


def check_finite(rewards: TokenRewards, source_name: str) -> TokenRewards:
    """Raise if a reward source produced NaN or inf; return ``rewards`` unchanged otherwise.

    Every position of ``values`` is checked, masked ones included: the contract says they are exactly 0, so a
    non-finite value there is a bug in the source too. ``seq_reward`` is checked when present.

    Args:
        rewards: the source's output, ``values (B, T)``, ``seq_reward (B,)`` or None.
        source_name: the source's name, used in the message.

    Returns:
        ``rewards`` itself.

    Raises:
        NonFiniteError: naming the source, the field, how many entries are bad and the first bad row.

    Example:
        >>> r = TokenRewards(values=torch.zeros(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
        >>> check_finite(r, "toy") is r
        True
    """
    for field, tensor in (("values", rewards.values), ("seq_reward", rewards.seq_reward)):
        bad = None if tensor is None else ~torch.isfinite(tensor)
        if bad is not None and bool(bad.any()):
            row = int(torch.nonzero(bad.reshape(bad.shape[0], -1).any(dim=1))[0, 0])
            raise NonFiniteError(f"reward source '{source_name}' produced {int(bad.sum())} non-finite {field} "
                                 f"(NaN or inf); first in row {row}")
    return rewards
