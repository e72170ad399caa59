"""Load any reward source by path or name: the one entry point of the PPO trainer and ``finegrain eval``.

``load_reward_source(path_or_name, *, policy_tokenizer, device=None, world_dir=None, **options)`` accepts

* a directory saved by :func:`finegrain.models.reward_model.save_reward_model` (``finegrain rm``'s ``final/``),
  or a run directory of ``finegrain rm`` (its ``final/`` is used): the source of that model's level
  (:mod:`finegrain.rewards.models`);
* a registered name. Built in: ``"oracle"`` and ``"oracle_credit"``, the built-in world's oracle
  (:class:`finegrain.rewards.rule.OracleRewardSource`: the score on the last token, or the ground-truth credit of
  every word on the token that ends it; the rules of ``world_dir`` when given). Other modules add theirs with
  :func:`register_reward_source`.

Options go to the model loader (``dtype``, ``double_softmax``, ``lag``, ``trust_remote_code``) or to the source
(``spread``, ``reduce``, ``seq_reward``, ``name``, ``batch_size``, ``max_length``); an option nobody takes is a
:class:`~finegrain.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from finegrain.errors import ConfigError
from finegrain.rewards.base import RewardSource

__all__ = ["load_reward_source", "register_reward_source", "registered_sources"]

_MODEL_OPTIONS = ("dtype", "double_softmax", "lag", "trust_remote_code", "splitter")

SourceFactory = Callable[..., RewardSource]
_REGISTRY: dict[str, SourceFactory] = {}


def register_reward_source(name: str, factory: SourceFactory) -> None:
    """Make ``load_reward_source(name, ...)`` call ``factory(policy_tokenizer=..., device=..., world_dir=...,
    **options)``; a name registered twice is replaced."""
    _REGISTRY[name] = factory


def registered_sources() -> list[str]:
    """Names :func:`load_reward_source` knows besides paths."""
    return sorted(_REGISTRY)


def _model_dir(path: Path) -> Path | None:
    from finegrain.models.reward_model import is_reward_model_dir

    for candidate in (path, path / "final"):
        if is_reward_model_dir(candidate):
            return candidate
    return None


def load_reward_source(
    path_or_name: str | Path,
    *,
    policy_tokenizer: Any,
    device: str | torch.device | None = None,
    world_dir: str | Path | None = None,
    **options: Any,
) -> RewardSource:
    """A :class:`~finegrain.rewards.base.RewardSource` from a saved reward model or a registered name.

    Args:
        path_or_name: a reward-model directory, a ``finegrain rm`` run directory, or a registered name.
        policy_tokenizer: the tokenizer of the batches the source will score (its rewards come back in that
            tokenization).
        device: where the reward model runs (default CPU).
        world_dir: the built-in world's directory, for sources that need it (the oracle's rules).
        **options: see the module docstring.

    Returns:
        The source.

    Raises:
        ConfigError: neither a reward-model directory nor a known name, or an option nobody takes.
    """
    from finegrain.models.reward_model import load_reward_model
    from finegrain.rewards.models import make_reward_source

    key = str(path_or_name)
    if key in _REGISTRY:
        return _REGISTRY[key](policy_tokenizer=policy_tokenizer, device=device, world_dir=world_dir, **options)
    path = Path(key)
    model_dir = _model_dir(path) if path.is_dir() else None
    if model_dir is None:
        names = ", ".join(registered_sources()) or "none"
        what = "a directory without a finegrain reward model (no finegrain_reward.json here or in final/)" \
            if path.is_dir() else "neither a directory nor a registered reward source"
        raise ConfigError(f"reward source {key!r} is {what}; give the final/ directory of `finegrain rm` or one of: "
                          f"{names}")
    model_options = {k: options.pop(k) for k in _MODEL_OPTIONS if k in options}
    model = load_reward_model(model_dir, device=device, **model_options)
    return make_reward_source(model, policy_tokenizer, **options)


# ------------------------------------------------------------------------------------------------- the oracle


def _oracle_factory(dense: bool) -> SourceFactory:
    """The world's oracle (:class:`finegrain.rewards.rule.OracleRewardSource`) under a registered name."""

    def make(*, policy_tokenizer: Any, device: Any = None, world_dir: Any = None, **options: Any) -> RewardSource:
        del device  # the oracle reads text on the CPU
        from finegrain.rewards.rule import OracleRewardSource
        from finegrain.world import is_built, load_world_config

        rules = load_world_config(world_dir).rules if world_dir and is_built(world_dir) else None
        try:
            return OracleRewardSource(policy_tokenizer, dense=dense, rules=rules, **options)
        except TypeError as err:
            raise ConfigError(f"reward source 'oracle': {err}") from None

    return make


register_reward_source("oracle", _oracle_factory(dense=False))
register_reward_source("oracle_credit", _oracle_factory(dense=True))
