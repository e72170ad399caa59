"""Bradley–Terry pairwise loss for reward models (sequence RM, SRM, token RM sequence scores).

``L = −log σ(s · (r_w − r_l) − m) + c · (r_w + r_l)² + λ · (r_w² + r_l²)`` per pair, with

* ``m`` an optional per-pair margin (Llama 2's margin loss, Touvron et al. 2023),
* ``s`` an optional per-pair logit scale (the SRM plain-sum ablation uses ``1 / max(N_w, N_l)``; Qiu et al. 2025,
  arXiv 2503.04793; docs/methods/reward-models.md),
* ``c`` the reward-centering coefficient (Eisenstein et al. 2023; TRL's ``center_rewards_coefficient``),
* ``λ`` the SRM penalty ``λ (R_w² + R_l²)`` (``penalty_coef``, 0 in the released SRM script;
  docs/methods/reward-models.md).

Written with ``logsigmoid`` so large margins neither overflow nor lose precision.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from finegrain.errors import DataError


class BradleyTerryOutput(NamedTuple):
    """Per-pair results of :func:`bradley_terry_loss`.

    Fields:
        losses: ``(B,)`` per-pair loss (take ``.mean()`` for the batch loss).
        accuracies: ``(B,)`` float, 1 where ``r_w > r_l`` (ties count as wrong), detached.
        margins: ``(B,)`` ``r_w − r_l``, detached.
    """

    losses: torch.Tensor
    accuracies: torch.Tensor
    margins: torch.Tensor


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    logit_scale: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    l2_coef: float = 0.0,
) -> BradleyTerryOutput:
    """Bradley–Terry loss ``−log σ(s (r_w − r_l) − m) + c (r_w + r_l)² + λ (r_w² + r_l²)`` per pair.

    Args:
        chosen_rewards: ``(B,)`` scores ``r_w`` of the chosen responses.
        rejected_rewards: ``(B,)`` scores ``r_l`` of the rejected responses.
        margin: ``(B,)`` or None; the required gap ``m`` (a column of the data set).
        logit_scale: ``(B,)``, a float, or None; ``s`` multiplies ``r_w − r_l`` before the margin.
        center_coef: ``c`` >= 0, pulls ``r_w + r_l`` towards 0.
        l2_coef: ``λ`` >= 0, the SRM penalty on ``r_w² + r_l²``.

    Returns:
        :class:`BradleyTerryOutput` with ``(B,)`` losses, accuracies and margins.

    Raises:
        DataError: shapes differ.

    Example:
        >>> out = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]))
        >>> round(out.losses.item(), 6)  # log 2
        0.693147
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise DataError(
            f"chosen {tuple(chosen_rewards.shape)} and rejected {tuple(rejected_rewards.shape)} rewards must be (B,)"
        )
    if margin is not None and margin.shape != chosen_rewards.shape:
        raise DataError(f"margin {tuple(margin.shape)} must be (B,) = {tuple(chosen_rewards.shape)}")
    diff = chosen_rewards - rejected_rewards
    logits = diff if logit_scale is None else diff * logit_scale
    if margin is not None:
        logits = logits - margin.to(logits.dtype)
    losses = -F.logsigmoid(logits)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    if l2_coef:
        losses = losses + l2_coef * (chosen_rewards**2 + rejected_rewards**2)
    margins = diff.detach()
    return BradleyTerryOutput(losses, (margins > 0).to(diff.dtype), margins)
