"""TDPO: Token-level Direct Preference Optimization (Zeng et al., ICML 2024, arXiv 2404.11999; docs/methods/tdpo.md).

Inputs are per-pair sums over response tokens (no length normalisation):
``M = Σ_t m_t ρ_t`` with ``ρ_t = ℓ^θ_t − ℓ^ref_t``, and the sequential KL ``S = Σ_t m_t K_t`` with
``K_t = KL(π_ref(·|s_t) ‖ π_θ(·|s_t))``. Compute the per-token pieces with
:func:`finegrain.ops.chunked.completion_stats` (``compute_kl=True``) and sum them with
:func:`finegrain.ops.masked_sum`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.errors import ConfigError
from finegrain.losses.dpo import PreferenceLossOutput

__all__ = ["TDPO_VARIANTS", "tdpo_loss"]

TDPO_VARIANTS = ("tdpo1", "tdpo2")


def tdpo_loss(
    chosen_logps_margin: torch.Tensor,
    rejected_logps_margin: torch.Tensor,
    chosen_position_kl: torch.Tensor,
    rejected_position_kl: torch.Tensor,
    beta: float,
    alpha: float = 0.5,
    variant: str = "tdpo2",
) -> PreferenceLossOutput:
    """TDPO1 / TDPO2 loss per pair (docs/methods/tdpo.md; matches ``tdpo_loss`` of the authors' ``trainers.py``).

    * TDPO1: ``L = −log σ(β [(M_w − M_l) − (S_l − S_w)])``; ``alpha`` is not used.
    * TDPO2: ``L = −log σ(β [(M_w − M_l) − α (S_l − sg(S_w))])``; the chosen response's KL ``S_w`` is detached,
      so the gradient pushes the rejected KL down but never pulls on the chosen one.

    With ``α = 1`` both variants have the same value (their gradients differ). The logged rewards are
    ``β (M + S)`` (TDPO's implicit reward, the sum of the token rewards ``β (ρ_t + K_t)``), detached; they are not
    used in the loss. The paper's recommended method, and our default, is TDPO2 with ``β = 0.1, α = 0.5``.

    Args:
        chosen_logps_margin: ``(B,)`` ``M_w = Σ_t m_t (ℓ^θ_t − ℓ^ref_t)`` on the chosen responses.
        rejected_logps_margin: ``(B,)`` ``M_l`` on the rejected responses.
        chosen_position_kl: ``(B,)`` ``S_w = Σ_t m_t K_t`` on the chosen responses.
        rejected_position_kl: ``(B,)`` ``S_l`` on the rejected responses.
        beta: ``β > 0``.
        alpha: ``α``, the weight of the KL difference in TDPO2.
        variant: ``"tdpo1"`` or ``"tdpo2"``.

    Returns:
        :class:`~finegrain.losses.dpo.PreferenceLossOutput`; ``extras`` holds the un-scaled, detached
        ``kl/chosen`` (``S_w``), ``kl/rejected`` (``S_l``) and ``kl/margin`` (``S_w − S_l``), each ``(B,)``.

    Raises:
        ConfigError: for an unknown ``variant``.

    Example:
        >>> out = tdpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5]), torch.tensor([1.0]), 1.0)
        >>> out.losses, out.chosen_rewards, out.extras["kl/margin"]
        (tensor([0.3869]), tensor([1.5000]), tensor([-0.5000]))
    """
    if variant not in TDPO_VARIANTS:
        raise ConfigError(f"TDPO variant must be one of {', '.join(TDPO_VARIANTS)}; got {variant!r}")
    logps_margin = chosen_logps_margin - rejected_logps_margin
    if variant == "tdpo1":
        logits = logps_margin - (rejected_position_kl - chosen_position_kl)
    else:
        logits = logps_margin - alpha * (rejected_position_kl - chosen_position_kl.detach())
    losses = -F.logsigmoid(beta * logits)
    chosen_kl, rejected_kl = chosen_position_kl.detach(), rejected_position_kl.detach()
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * (chosen_logps_margin.detach() + chosen_kl)),
        rejected_rewards=(beta * (rejected_logps_margin.detach() + rejected_kl)),
        extras={"kl/chosen": chosen_kl, "kl/rejected": rejected_kl, "kl/margin": chosen_kl - rejected_kl},
    )
