"""Advantage estimators for online RL over dense per-token rewards (docs/methods/ppo.md).

Every function works on the response layout ``(B, T)`` of :mod:`finegrain.types` with a ``response_mask``
(True on the actions of the response, EOS included). Masked positions are *transparent*: they neither
receive nor pass on credit, so a row behaves exactly as if its valid actions were packed to the left and the
rest cut off (the naive reference in the tests does exactly that). After the last valid action the value and
the reward are 0 and the bootstrap value is 0: a response is a finished episode, also when it was truncated
at ``max_new_tokens`` (the common choice of RLHF code, e.g. OpenRLHF and verl).

All functions are vectorised over the batch; the recursions run one reversed loop over ``T``. Advantages and
returns are targets: pass detached rewards and old values (or call under ``torch.no_grad()``). This module
imports only torch and :mod:`finegrain.ops`.
"""

from __future__ import annotations

import torch

from finegrain.ops.masked import masked_whiten, zero_masked

__all__ = [
    "discounted_returns",
    "gae_advantages",
    "reinforce_advantages",
    "rloo_advantages",
    "whiten_advantages",
]


def _check(name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
    if x.shape != mask.shape or x.dim() != 2:
        raise ValueError(f"{name} {tuple(x.shape)} and response_mask {tuple(mask.shape)} must both be (B, T)")


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a dense reward (Schulman et al., 2016, "High-Dimensional
    Continuous Control Using Generalized Advantage Estimation", eqs. 10-16).

    With ``V_{T_end} = 0`` after the last valid action and ``A_{T_end} = 0``::

        δ_t = R_t + γ·V_{t+1} − V_t
        A_t = δ_t + γλ·A_{t+1}
        returns_t = A_t + V_t              (the value-function target)

    where ``t+1`` means the next *valid* action of the row. With ``γ = λ = 1`` this telescopes to
    ``A_t = Σ_{k≥t} R_k − V_t`` (return-to-go minus value). TLCR uses ``γ = 1, λ = 0.95`` (Yoon et al. 2024;
    docs/methods/ppo.md).

    Args:
        rewards: ``(B, T)`` per-action rewards ``R_t`` (e.g. from :func:`finegrain.rl.rewards.dense_rewards`).
        values: ``(B, T)`` critic values ``V(s_t)`` at the predicting states.
        response_mask: ``(B, T)`` bool, True on valid actions.
        gamma: discount ``γ``.
        lam: GAE ``λ``.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, exactly 0 where ``response_mask`` is False.

    Example:
        >>> r = torch.tensor([[0.0, 1.0, 0.0]]); v = torch.tensor([[0.5, 0.5, 9.0]])
        >>> adv, ret = gae_advantages(r, v, torch.tensor([[True, True, False]]), gamma=1.0, lam=1.0)
        >>> adv, ret
        (tensor([[0.5000, 0.5000, 0.0000]]), tensor([[1., 1., 0.]]))
    """
    _check("rewards", rewards, response_mask)
    _check("values", values, response_mask)
    mask = response_mask.to(torch.bool)
    rewards, values = zero_masked(rewards, mask), zero_masked(values, mask)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = zero_masked(adv, m)
        # A masked position passes the next valid action's value and advantage through unchanged.
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    returns = zero_masked(advantages + values, mask)
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go ``G_t = Σ_{k≥t} γ^{k−t} R_k`` over the valid actions of each row.

    Args:
        rewards: ``(B, T)`` per-action rewards.
        response_mask: ``(B, T)`` bool.
        gamma: discount ``γ`` (1 in REINFORCE as used by SRM's RL script; docs/methods/ppo.md).

    Returns:
        ``(B, T)`` returns, exactly 0 where ``response_mask`` is False.

    Example:
        >>> discounted_returns(torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[True, True, True]]), gamma=0.5)
        tensor([[1.5000, 1.0000, 2.0000]])
    """
    _check("rewards", rewards, response_mask)
    mask = response_mask.to(torch.bool)
    running = torch.zeros_like(rewards[:, 0])
    returns = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = zero_masked(running, mask[:, t])
    return returns


def whiten_advantages(advantages: torch.Tensor, response_mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise advantages to zero mean and unit variance over all valid actions of the batch.

    ``(A − mean(A[m])) / sqrt(var(A[m]) + 1e-8)`` via :func:`finegrain.ops.masked_whiten`; masked positions
    are 0. Call it on the whole rollout batch (the replay buffer), not per micro-batch.

    Args:
        advantages: ``(B, T)``.
        response_mask: ``(B, T)`` bool.
        shift_mean: subtract the mean (True) or only rescale (False).

    Returns:
        ``(B, T)`` whitened advantages.
    """
    _check("advantages", advantages, response_mask)
    return masked_whiten(advantages, response_mask, shift_mean=shift_mean)


def reinforce_advantages(
    rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE with return-to-go, as in the SRM paper's RL script (OpenRLHF ``advantage_estimator=reinforce``;
    Qiu et al. 2025, arXiv 2503.04793; docs/methods/ppo.md).

    ``G_t = Σ_{k≥t} γ^{k−t} R_k`` (γ = 1 by default) and ``A_t = (G_t − mean) / std`` with the mean and the
    standard deviation taken over every valid action of the batch (``normalize=True``); no critic.

    Args:
        rewards: ``(B, T)`` per-action rewards.
        response_mask: ``(B, T)`` bool.
        gamma: discount ``γ``.
        normalize: whiten the returns over the batch to get the advantages.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, exactly 0 where ``response_mask`` is False.
    """
    returns = discounted_returns(rewards, response_mask, gamma)
    advantages = whiten_advantages(returns, response_mask) if normalize else returns
    return advantages, returns


def rloo_advantages(
    seq_returns: torch.Tensor, num_samples: int, response_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al., 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs", eq. 7; Kool et al., 2019).

    For the ``k`` samples ``i`` of one prompt, ``A_i = R_i − (1/(k−1)) Σ_{j≠i} R_j = k/(k−1)·(R_i − mean_j R_j)``.
    Rows are grouped by prompt contiguously (prompt-major, as ``repeat_interleave(k)`` or
    ``generate(num_return_sequences=k)`` lay them out): rows ``[g·k, (g+1)·k)`` are the samples of prompt ``g``.

    Args:
        seq_returns: ``(B,)`` sequence returns, e.g. ``masked_sum(rewards, response_mask, dim=-1)``.
        num_samples: ``k >= 2`` samples per prompt; ``B`` must be a multiple of it.
        response_mask: optional ``(B, T)`` bool; when given, each row's advantage is broadcast to its valid
            actions (0 elsewhere).

    Returns:
        ``(B,)`` advantages, or ``(B, T)`` when ``response_mask`` is given.

    Example:
        >>> rloo_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0]), num_samples=2)
        tensor([-2.,  2.,  0.,  0.])
    """
    if num_samples < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got num_samples={num_samples}")
    if seq_returns.dim() != 1 or seq_returns.shape[0] % num_samples:
        raise ValueError(f"seq_returns {tuple(seq_returns.shape)} must be (B,) with B a multiple of {num_samples}")
    grouped = seq_returns.view(-1, num_samples)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_samples - 1)
    advantages = (grouped - baseline).reshape(-1)
    return advantages if response_mask is None else zero_masked(advantages[:, None], response_mask)
