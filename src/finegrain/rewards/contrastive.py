"""Token rewards as pure tensor maths: contrastive prompting (T-REG), implicit DPO/TDPO rewards, and squashing.

Every function returns a ``(B, T)`` tensor in the response layout, exactly 0 where the mask is False, and
**detached**: token rewards are targets (T-REG regularises towards them, PPO adds them to returns), so no gradient
ever flows into whatever produced them. Building the two templated forward passes of contrastive prompting is the
job of the reward source that wraps these functions; here only the arithmetic lives.
"""

from __future__ import annotations

import torch

__all__ = ["contrastive_token_rewards", "implicit_token_rewards", "squash_to_half"]


def _zero_masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where, not a product with the mask: NaN or inf at a masked position must not survive as NaN.
    return torch.where(mask.to(torch.bool), values, torch.zeros((), dtype=values.dtype, device=values.device))


def squash_to_half(values: torch.Tensor) -> torch.Tensor:
    """Map any real token score into T-REG's reward range: ``σ(x) − ½ ∈ (−½, ½)``.

    This is the map that contrastive prompting applies to its log-prob difference (spec §2.1), so feeding another
    source's scores through it (a token RM's ``r_φ``, a discriminator's logit, an implicit DPO reward) puts them on
    the same scale: sign-preserving, ``0 ↦ 0``, slope ¼ at 0, bounded, so one ``α`` means the same for every source.
    It is not linear: a source already bounded in ``(−1, 1)`` (e.g. TLCR's ``2·P(+) − 1``) keeps its
    proportions better with a linear ``r/2`` (spec §6). Computed as ``½·tanh(x/2)``, the same function without
    the cancellation in ``σ(x) − ½`` near 0.

    Args:
        values: float tensor of any shape.

    Returns:
        Tensor of the same shape and dtype, detached.

    Example:
        >>> squash_to_half(torch.tensor([0.0, 2.0, -50.0]))
        tensor([ 0.0000,  0.3808, -0.5000])
    """
    return 0.5 * torch.tanh(0.5 * values.detach())


def contrastive_token_rewards(logp_plus: torch.Tensor, logp_minus: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """T-REG's self-generated token rewards from contrastive prompting (Zhou et al., ACL 2025; spec §2.1, §7.2).

    ``r̂_t = (σ(log π_ref(y_t | P+(x), y_<t) − log π_ref(y_t | P−(x), y_<t)) − ½) · m_t``

    where ``P+`` asks for a better answer and ``P−`` for a worse one, both scoring the same response tokens.

    Args:
        logp_plus: ``(B, T)`` token log-probs of the response under the positive prompt.
        logp_minus: ``(B, T)`` token log-probs under the negative prompt.
        mask: ``(B, T)`` bool response mask.

    Returns:
        ``(B, T)`` rewards in ``(−½, ½)``, 0 where ``mask`` is False, detached.

    Example:
        >>> contrastive_token_rewards(torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-3.0, -2.0, 9.0]]),
        ...                           torch.tensor([[True, True, False]]))
        tensor([[0.3808, 0.0000, 0.0000]])
    """
    return _zero_masked(squash_to_half(logp_plus - logp_minus), mask)


def implicit_token_rewards(
    token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    token_kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """Implicit token rewards of DPO, ``β ρ_t``, or of TDPO, ``β (ρ_t + K_t)`` (spec §1.2, §6).

    ``ρ_t = ℓ^θ_t − ℓ^ref_t``; ``K_t = KL(π_ref(·|s_t) ‖ π_θ(·|s_t))``. Summed over the response they give the
    sequence rewards that DPO (``β Σ ρ``) and TDPO (``β (M + S)``) log.

    Args:
        token_logps: ``(B, T)`` policy token log-probs.
        ref_token_logps: ``(B, T)`` reference token log-probs.
        mask: ``(B, T)`` bool response mask.
        beta: ``β``.
        token_kl: ``(B, T)`` forward token KL for TDPO's reward, or None for DPO's.

    Returns:
        ``(B, T)`` rewards, 0 where ``mask`` is False, detached.

    Example:
        >>> implicit_token_rewards(torch.tensor([[-1.0, -5.0]]), torch.tensor([[-2.0, -1.0]]),
        ...                        torch.tensor([[True, False]]), beta=0.1)
        tensor([[0.1000, 0.0000]])
    """
    rho = token_logps.detach() - ref_token_logps.detach()
    if token_kl is not None:
        rho = rho + token_kl.detach()
    return _zero_masked(beta * rho, mask)
