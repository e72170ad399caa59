"""Online RL pieces: rollouts, dense per-action rewards and advantage estimators (GAE, REINFORCE, RLOO).

The PPO losses are in :mod:`finegrain.losses.ppo`; the KL estimators in :mod:`finegrain.ops.kl`.
"""

from finegrain.rl.advantages import (
    discounted_returns,
    gae_advantages,
    reinforce_advantages,
    rloo_advantages,
    whiten_advantages,
)
from finegrain.rl.rewards import RunningMoments, dense_rewards, reward_metrics
from finegrain.rl.rollout import resolve_special_ids, sample_next_token, sample_rollouts, score_rollout

__all__ = [
    "RunningMoments",
    "dense_rewards",
    "discounted_returns",
    "gae_advantages",
    "reinforce_advantages",
    "resolve_special_ids",
    "reward_metrics",
    "rloo_advantages",
    "sample_next_token",
    "sample_rollouts",
    "score_rollout",
    "whiten_advantages",
]
