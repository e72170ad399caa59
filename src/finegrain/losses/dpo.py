"""Sequence-level preference losses: DPO (sigmoid) and SimPO.

Both take per-pair sequence log-probs (``(B,)``; see :func:`finegrain.ops.logprobs.sequence_logps`) and return a
:class:`PreferenceLossOutput` of per-pair losses plus detached implicit rewards. Batch loss = ``losses.mean()``,
left to the caller so that gradient accumulation can weight pairs as it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["PreferenceLossOutput", "dpo_loss", "dpo_sft_loss", "simpo_loss"]


@dataclass
class PreferenceLossOutput:
    """What every pairwise preference loss returns.

    Fields:
        losses: ``(B,)`` per-pair loss (differentiable); the batch loss is its mean.
        chosen_rewards: ``(B,)`` detached implicit reward of the chosen response (logged as ``rewards/chosen``).
        rejected_rewards: ``(B,)`` detached implicit reward of the rejected response (``rewards/rejected``).
        extras: detached diagnostics keyed by their metric name (e.g. ``kl/chosen``, ``weights``), each ``(B,)``.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Direct Preference Optimization, sigmoid loss (Rafailov et al., NeurIPS 2023, eq. 7).

    With ``u = β [(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]``:

    ``L = −(1 − ε) log σ(u) − ε log σ(−u)``

    where ``ε = label_smoothing`` is conservative DPO (Mitchell 2023, as in TRL's ``sigmoid`` loss); ``ε = 0`` is
    the paper's loss. Implicit rewards ``r = β (log π_θ(y) − log π_ref(y))`` are returned detached.
    The reference log-probs are constants of the loss; pass them without gradient.

    Args:
        chosen_logps: ``(B,)`` ``Σ_t m_t ℓ^θ_t`` of the chosen responses.
        rejected_logps: ``(B,)`` same for the rejected responses.
        ref_chosen_logps: ``(B,)`` reference log-probs of the chosen responses.
        ref_rejected_logps: ``(B,)`` reference log-probs of the rejected responses.
        beta: ``β > 0``, the KL-regularisation strength.
        label_smoothing: ``ε ∈ [0, 0.5)``, the assumed probability that a label is flipped.

    Returns:
        :class:`PreferenceLossOutput` with ``losses (B,)`` and ``chosen_rewards`` / ``rejected_rewards (B,)``.

    Example:
        >>> out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), 1.0)
        >>> out.losses, out.chosen_rewards, out.rejected_rewards
        (tensor([0.3133]), tensor([0.]), tensor([-1.]))
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    u = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(u)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-u)
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


def dpo_sft_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    beta: float,
    sft_weight: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """DPO plus an SFT (negative log-likelihood) term on the chosen response: T-REG's *DPO-SFT* ablation.

    ``L = L_DPO + λ · NLL(y_w)``,  ``NLL(y_w) = −(1/|y_w|) Σ_t m_t log π_θ(y_t|s_t)``

    with ``L_DPO`` from :func:`dpo_loss` (Rafailov et al., NeurIPS 2023). T-REG (Zhou et al., ACL 2025, arXiv
    2412.02685; docs/methods/treg.md) compares against DPO with an added SFT loss; the same objective is RPO (Pang et
    al., NeurIPS 2024, arXiv 2404.19733), whose NLL is length-normalised per response as here, and TRL's
    ``rpo_alpha`` (TRL averages the NLL over all chosen tokens of a batch instead of per response). ``λ = 0`` is
    exactly :func:`dpo_loss`. Lengths below 1 are clamped to 1 (an empty response has NLL 0).

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing: as
            :func:`dpo_loss` (``(B,)`` sequence log-probs, ``β > 0``, conservative DPO's ``ε``).
        chosen_lengths: ``(B,)`` ``|y_w|``, the number of chosen response tokens.
        sft_weight: ``λ ≥ 0``.

    Returns:
        :class:`PreferenceLossOutput` with DPO's rewards and ``extras``: ``nll_loss`` (``NLL(y_w)``) and
        ``losses/base`` (``L_DPO``), both ``(B,)`` and detached.

    Example:
        >>> out = dpo_sft_loss(torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
        ...                    torch.tensor([4]), beta=1.0, sft_weight=1.0)
        >>> out.losses, out.extras["nll_loss"]
        (tensor([1.1931]), tensor([0.5000]))
    """
    if sft_weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    out = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing)
    nll = -chosen_logps / chosen_lengths.to(chosen_logps.dtype).clamp(min=1.0)
    base = out.losses
    out.losses = base + sft_weight * nll
    out.extras = {"nll_loss": nll.detach(), "losses/base": base.detach()}
    return out


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
) -> PreferenceLossOutput:
    """Simple Preference Optimization (Meng, Xia and Chen, NeurIPS 2024, eq. 6): reference-free, length-normalised.

    With the average log-likelihood reward ``r(y) = (β / |y|) log π_θ(y)``:

    ``L = −log σ(r(y_w) − r(y_l) − γ)``

    ``γ`` is the target reward margin in reward units (the paper reports ``γ/β``; TRL's ``simpo_gamma`` is ``γ``
    too). Lengths below 1 are clamped to 1, so an empty response gives reward 0 instead of NaN.

    Args:
        chosen_logps: ``(B,)`` summed token log-probs ``Σ_t m_t ℓ^θ_t`` of the chosen responses.
        rejected_logps: ``(B,)`` same for the rejected responses.
        chosen_lengths: ``(B,)`` number of response tokens ``|y_w|`` (int or float).
        rejected_lengths: ``(B,)`` ``|y_l|``.
        beta: ``β > 0`` reward scale.
        gamma: ``γ ≥ 0`` target margin.

    Returns:
        :class:`PreferenceLossOutput`; rewards are ``r(y)``, detached.

    Example:
        >>> out = simpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([2]), torch.tensor([3]), 2.0, 1.0)
        >>> out.losses, out.chosen_rewards, out.rejected_rewards
        (tensor([0.3133]), tensor([-2.]), tensor([-4.]))
    """
    chosen_rewards = beta * chosen_logps / chosen_lengths.to(chosen_logps.dtype).clamp(min=1.0)
    rejected_rewards = beta * rejected_logps / rejected_lengths.to(rejected_logps.dtype).clamp(min=1.0)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return PreferenceLossOutput(
        losses=losses, chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach()
    )
