"""Reward sources and the placement of scores on response tokens (imports torch only).

Every source returns a :class:`finegrain.types.TokenRewards`; the placement functions put scalar and span scores
on the right tokens of the ``(B, T)`` response layout.
"""

from finegrain.rewards.base import RewardSource, check_finite
from finegrain.rewards.placement import (
    last_token_index,
    place_at_span_ends,
    place_on_last_token,
    spread_over_spans,
)

__all__ = [
    "RewardSource",
    "check_finite",
    "last_token_index",
    "place_at_span_ends",
    "place_on_last_token",
    "spread_over_spans",
]
