"""Reward sources and the placement of scores on response tokens (imports torch only).

Every source returns a :class:`finegrain.types.TokenRewards`; the placement functions put scalar and span scores
on the right tokens of the ``(B, T)`` response layout. The sources themselves and :func:`load_reward_source`
(``_LAZY``) are imported on first use, so that ``import finegrain.rewards`` stays light.
"""

from finegrain.lazy import lazy_attributes
from finegrain.rewards.base import RewardSource, check_finite
from finegrain.rewards.placement import place_at_span_ends, place_on_last_token, spread_over_spans

_LAZY = {
    "ContrastiveRewardSource": "finegrain.rewards.contrastive",
    "ContrastiveTemplate": "finegrain.rewards.contrastive",
    "contrastive_token_rewards": "finegrain.rewards.contrastive",
    "implicit_token_rewards": "finegrain.rewards.contrastive",
    "ImplicitRewardSource": "finegrain.rewards.implicit",
    "RewardModelSource": "finegrain.rewards.models",
    "SequenceRMSource": "finegrain.rewards.models",
    "SentenceRMSource": "finegrain.rewards.models",
    "TokenRMSource": "finegrain.rewards.models",
    "DiscriminatorSource": "finegrain.rewards.models",
    "FunctionRewardSource": "finegrain.rewards.rule",
    "JudgedRewardSource": "finegrain.rewards.rule",
    "load_reward_source": "finegrain.rewards.registry",
    "register_reward_source": "finegrain.rewards.registry",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    *_LAZY,
    "RewardSource",
    "check_finite",
    "place_at_span_ends",
    "place_on_last_token",
    "spread_over_spans",
]
