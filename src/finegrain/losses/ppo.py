"""PPO losses on per-token tensors (Schulman et al., 2017, "Proximal Policy Optimization Algorithms", eq. 7 and 9).

Pure functions: inputs are per-token log-probs, advantages, values and a ``response_mask`` in the response
layout ``(B, T)`` of :mod:`finegrain.types`; no model is called here. Diagnostics are detached.

Reduction over tokens (``reduction``):

* ``"token"`` (default): the mean over every valid action of the batch, ``Σ_{i,t} m·ℓ / Σ_{i,t} m`` -- each
  token weighs the same, so long responses weigh more (TRL, OpenRLHF and verl's ``token-mean``);
* ``"sequence"``: the mean over rows of each row's token mean -- each response weighs the same (the original
  per-sample PPO-for-RLHF reduction, verl's ``seq-mean-token-mean``); rows without valid actions are skipped.

This module imports only torch and :mod:`finegrain.ops`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from finegrain.ops.kl import kl_k3
from finegrain.ops.masked import masked_mean

__all__ = [
    "PolicyLossOutput",
    "ValueLossOutput",
    "aggregate",
    "entropy_bonus",
    "ppo_policy_loss",
    "ppo_value_loss",
]


class PolicyLossOutput(NamedTuple):
    """Result of :func:`ppo_policy_loss`: ``loss`` (scalar, differentiable), ``clipfrac`` and ``approx_kl``
    (scalars, detached)."""

    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor


class ValueLossOutput(NamedTuple):
    """Result of :func:`ppo_value_loss`: ``loss`` (scalar, differentiable) and ``clipfrac`` (scalar, detached)."""

    loss: torch.Tensor
    clipfrac: torch.Tensor


def aggregate(per_token: torch.Tensor, response_mask: torch.Tensor, reduction: str = "token") -> torch.Tensor:
    """Reduce a ``(B, T)`` per-token quantity to a scalar with ``reduction`` ∈ ``{"token", "sequence"}``.

    Naive equivalent: ``"token"`` → ``per_token[mask].mean()``; ``"sequence"`` →
    ``mean([per_token[i][mask[i]].mean() for i if mask[i].any()])``. Empty masks give 0, never NaN.

    Args:
        per_token: ``(B, T)`` float.
        response_mask: ``(B, T)`` bool.
        reduction: ``"token"`` or ``"sequence"``.

    Returns:
        A scalar tensor.

    Example:
        >>> x, m = torch.tensor([[1.0, 3.0], [5.0, 0.0]]), torch.tensor([[True, True], [True, False]])
        >>> aggregate(x, m, "token"), aggregate(x, m, "sequence")
        (tensor(3.), tensor(3.5000))
    """
    if reduction == "token":
        return masked_mean(per_token, response_mask)
    if reduction == "sequence":
        rows = masked_mean(per_token, response_mask, dim=-1)
        return masked_mean(rows, response_mask.to(torch.bool).any(dim=-1))
    raise ValueError(f"unknown reduction {reduction!r}; choose 'token' or 'sequence'")


def ppo_policy_loss(
    token_logps: torch.Tensor,
    old_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float = 0.2,
    reduction: str = "token",
) -> PolicyLossOutput:
    """Clipped surrogate policy loss (PPO, eq. 7), per action then reduced.

    ``r_t = exp(ℓ^θ_t − ℓ^old_t)``, ``L_t = max(−A_t·r_t, −A_t·clip(r_t, 1−ε, 1+ε))``, loss = ``aggregate(L)``.
    ``clipfrac`` is the share of valid actions where the clipped term is the larger one (the gradient is 0
    there); ``approx_kl`` estimates ``KL(π_old ‖ π_θ)`` with the non-negative k3 estimator
    ``e^{ℓ^θ−ℓ^old} − 1 − (ℓ^θ − ℓ^old)``, token-averaged.

    Args:
        token_logps: ``(B, T)`` current policy log-probs of the sampled tokens (with gradient).
        old_token_logps: ``(B, T)`` log-probs at rollout time (no gradient).
        advantages: ``(B, T)`` advantages (no gradient).
        response_mask: ``(B, T)`` bool.
        clip_eps: ``ε`` (0.2 in the official TLCR and SRM scripts; Yoon et al. 2024, Qiu et al. 2025).
        reduction: ``"token"`` or ``"sequence"`` (module docstring).

    Returns:
        :class:`PolicyLossOutput` ``(loss, clipfrac, approx_kl)``, all scalars.

    Example:
        >>> m = torch.tensor([[True, True]])
        >>> out = ppo_policy_loss(torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), m)
        >>> out.loss, out.clipfrac
        (tensor(-0.8500), tensor(0.5000))
    """
    mask = response_mask.to(torch.bool)
    ratio = torch.exp(token_logps - old_token_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate(per_token, mask, reduction)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(per_token.dtype), mask)
        approx_kl = masked_mean(kl_k3(old_token_logps, token_logps.detach()), mask)
    return PolicyLossOutput(loss, clipfrac, approx_kl)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    reduction: str = "token",
) -> ValueLossOutput:
    """Clipped value loss ``½·max((V_t − R_t)², (V^old_t + clip(V_t − V^old_t, −ε_v, ε_v) − R_t)²)``.

    The clipped form is the one of the PPO baselines and of TLCR's official trainer (ε_v = 0.2, factor ½; Yoon et
    al. 2024; docs/methods/ppo.md). ``clip_eps=None`` gives the plain ``½·(V_t − R_t)²``. ``clipfrac`` is the share
    of valid actions where the clipped term is the larger one.

    Args:
        values: ``(B, T)`` current critic values (with gradient).
        old_values: ``(B, T)`` values at rollout time (no gradient).
        returns: ``(B, T)`` targets, e.g. from :func:`finegrain.rl.advantages.gae_advantages` (no gradient).
        response_mask: ``(B, T)`` bool.
        clip_eps: ``ε_v`` or None.
        reduction: ``"token"`` or ``"sequence"``.

    Returns:
        :class:`ValueLossOutput` ``(loss, clipfrac)``, scalars.

    Example:
        >>> m = torch.tensor([[True]])
        >>> ppo_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), m, clip_eps=0.5)
        ValueLossOutput(loss=tensor(1.1250), clipfrac=tensor(1.))
    """
    mask = response_mask.to(torch.bool)
    unclipped = (values - returns).square()
    if clip_eps is None:
        per_token = unclipped
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped = (clipped_values - returns).square()
        per_token = torch.maximum(unclipped, clipped)
        with torch.no_grad():
            clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return ValueLossOutput(0.5 * aggregate(per_token, mask, reduction), clipfrac)


def entropy_bonus(token_entropy: torch.Tensor, response_mask: torch.Tensor, reduction: str = "token") -> torch.Tensor:
    """Mean policy entropy over valid actions, for the term ``− c_ent · H`` of the PPO objective (eq. 9).

    Args:
        token_entropy: ``(B, T)`` per-position entropy ``H(p^θ_t)`` (e.g. :func:`finegrain.ops.logprobs.token_entropy`
            of the predicting logits).
        response_mask: ``(B, T)`` bool.
        reduction: ``"token"`` or ``"sequence"``.

    Returns:
        A scalar; subtract ``c_ent`` times it from the loss to encourage exploration.
    """
    return aggregate(token_entropy, response_mask, reduction)
