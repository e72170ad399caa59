"""The reward-source interface: every source maps a batch to dense per-token rewards.

The contract (:class:`finegrain.types.TokenRewards`): ``values (B, T)`` aligned with the response tokens of the
policy's tokenization, exactly 0 where ``mask`` is False, plus an optional sequence score ``seq_reward (B,)``.
Sequence RMs, sentence RMs, token RMs, TLCR discriminators, contrastive prompting and implicit DPO rewards all
implement :class:`RewardSource`, so any of them can feed any optimizer (DESIGN.md, spec section 6).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from finegrain.errors import NonFiniteError
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


def _first_bad_row(t: torch.Tensor) -> tuple[int, int]:
    bad = ~torch.isfinite(t)
    rows = bad.reshape(bad.shape[0], -1).any(dim=1) if t.dim() > 1 else bad
    return int(bad.sum()), int(torch.nonzero(rows)[0, 0])


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
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            count, row = _first_bad_row(tensor)
            raise NonFiniteError(
                f"reward source '{source_name}' produced {count} non-finite {field} (NaN or inf); first in row {row}"
            )
    return rewards
