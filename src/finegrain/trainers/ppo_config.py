"""The config of ``finegrain ppo``, apart from the loop (:mod:`finegrain.trainers.ppo`, which re-exports it) so
that :mod:`finegrain.trainers.ppo_models` can import it."""

from __future__ import annotations

import dataclasses
from typing import Literal

from finegrain.config import TrainConfig, check_ranges, option
from finegrain.errors import ConfigError


@dataclasses.dataclass
class PPOConfig(TrainConfig):
    """Online RL (PPO with GAE and a critic, REINFORCE or RLOO) with dense per-token rewards from any source."""

    reward: list[str] = option(
        default_factory=list,
        help="reward source(s), each a reward spec: a saved reward-model directory (`finegrain rm`'s run or final/), "
        "'python:module:function' (a function of prompts and responses), 'contrastive', 'implicit:POLICY_DIR', or a "
        "registered kind (on the built-in world: 'oracle', its score on the last token, or 'oracle:credit', its "
        "per-word credit; the world's default is oracle); see docs/reward-sources.md")
    judge: str | None = option(None, "a reward spec logged but not trained on: its score (<name>/reward) and per-row "
                               "metrics for every rollout batch and evaluation (default on the built-in world: oracle)")
    reward_scales: list[float] = option(default_factory=list, help="one scale per --reward source (default 1 each)")
    kl_coef: float = option(0.05, "c_KL: weight of the per-token KL penalty in the reward")
    kl_estimator: Literal["k1", "k2", "k3", "full"] = option(
        "k1", "KL term per token: k1 = log-ratio, k2 = log-ratio²/2, k3 = e^-ρ - 1 + ρ, full = KL over the vocabulary")
    reward_clip: float | None = option(None, "clip every token's task reward to [-c, c] after normalisation (TLCR: 5)")
    reward_normalization: Literal["none", "batch", "running"] = option(
        "none", "normalise sequence returns by the batch's or running mean and std")
    estimator: Literal["gae", "reinforce", "rloo"] = option(
        "gae", "advantages: GAE with a critic, REINFORCE return-to-go (SRM), or RLOO (needs num_samples >= 2)")
    gamma: float = option(1.0, "discount γ")
    lam: float = option(0.95, "GAE λ")
    whiten_advantages: bool = option(True, "normalise advantages over the rollout batch")
    clip_eps: float = option(0.2, "PPO ratio clip ε")
    value_clip_eps: float | None = option(0.2, "value clip ε_v (none: unclipped value loss)")
    vf_coef: float = option(0.1, "weight of the value loss (in the policy's objective with --critic shared)")
    entropy_coef: float = option(0.0, "entropy bonus coefficient")
    loss_reduction: Literal["token", "sequence"] = option(
        "token", "mean over all tokens of a minibatch, or mean over responses of each response's token mean")
    ppo_epochs: int = option(4, "passes over each rollout batch")
    num_mini_batches: int = option(1, "optimizer steps per pass over a rollout batch")
    rollout_batch_size: int = option(32, "prompts per rollout batch (over all processes)")
    num_samples: int = option(1, "responses per prompt (RLOO needs >= 2)")
    generation_batch_size: int | None = option(
        None, "prompts per sampling call, each drawing from its own random stream named by --seed and its place in the "
        "data, so that runs with the same value sample the same responses on any number of processes (default: all "
        "of a process's prompts in one call, from the global RNG)")
    temperature: float = option(1.0, "sampling temperature (> 0); log-probs are taken at this temperature")
    top_p: float = option(1.0, "nucleus sampling mass (1: off)")
    top_k: int = option(0, "keep the k most likely tokens (0: off)")
    max_new_tokens: int = option(64, "longest sampled response")
    critic: Literal["separate", "shared"] = option(
        "separate", "value head on a separate critic initialised from the policy, or on the policy's own backbone")
    critic_learning_rate: float | None = option(None, "critic (or value head) learning rate; default: learning_rate")
    lag: int = option(0, "TLCR compat: credit a token's reward to the action `lag` positions later (official code: 1)")
    eval_sampling: Literal["greedy", "sample"] = option("greedy", "how responses to held-out prompts are decoded")
    score_chunk_rows: int = option(32, "rows per forward pass when scoring rollouts")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward_scales and len(self.reward_scales) != len(self.reward):
            raise ConfigError(f"--reward_scales has {len(self.reward_scales)} values for {len(self.reward)} --reward "
                              "sources; give one scale per source")
        if self.estimator == "rloo" and self.num_samples < 2:
            raise ConfigError("--estimator rloo needs --num_samples >= 2 (the other samples of a prompt are the baseline)")
        if self.gradient_accumulation_steps != 1:
            raise ConfigError("ppo accumulates micro-batches of --per_device_train_batch_size rows within each minibatch; "
                              "set the minibatch with --num_mini_batches and leave --gradient_accumulation_steps at 1")
        check_ranges(self, positive=("ppo_epochs", "num_mini_batches", "rollout_batch_size", "num_samples",
                                     "max_new_tokens", "score_chunk_rows", "clip_eps", "reward_clip",
                                     "value_clip_eps", "critic_learning_rate"),
                     nonnegative=("kl_coef", "vf_coef", "entropy_coef", "lag", "top_k"), unit_interval=("top_p",))
        if (self.rollout_batch_size * self.num_samples) % self.num_mini_batches:
            raise ConfigError(f"rollout_batch_size x num_samples ({self.rollout_batch_size * self.num_samples}) must be a "
                              f"multiple of num_mini_batches ({self.num_mini_batches})")
        if self.generation_batch_size is not None:
            if self.generation_batch_size < 1 or self.rollout_batch_size % self.generation_batch_size:
                raise ConfigError(f"generation_batch_size ({self.generation_batch_size}) must divide rollout_batch_size "
                                  f"({self.rollout_batch_size})")
            if (self.generation_batch_size * self.num_samples) % self.num_mini_batches:
                raise ConfigError(f"generation_batch_size x num_samples ({self.generation_batch_size * self.num_samples}) "
                                  f"must be a multiple of num_mini_batches ({self.num_mini_batches}): every minibatch "
                                  "takes the same share of each sampling group")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"gamma and lam must lie in [0, 1], got {self.gamma} and {self.lam}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (PPO needs the sampling distribution), got {self.temperature}")
        if self.max_new_tokens > self.max_length - self.max_prompt_length:
            raise ConfigError(f"max_new_tokens ({self.max_new_tokens}) exceeds max_length - max_prompt_length "
                              f"({self.max_length - self.max_prompt_length}); raise --max_length or lower one of them")

    @property
    def scales(self) -> list[float]:
        return list(self.reward_scales) or [1.0] * len(self.reward)
