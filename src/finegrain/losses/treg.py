"""T-REG: preference optimisation with token-level reward regularisation (Zhou, Zhang, Zhao and Meng, ACL 2025).

arXiv 2412.02685. The official code is not available: DPO-REG follows the paper's description as written out in
docs/methods/treg.md, and SimPO-REG (the paper's variant for SimPO) is built by analogy with it, our choice, not a
formula taken from the paper. Per pair, with sequence rewards ``Z`` of the base loss:

* DPO base: ``Z(y) = β Σ_t m_t (ℓ^θ_t − ℓ^ref_t)``, ``L_base = −log σ(Z_w − Z_l)``;
* SimPO base: ``Z(y) = (β/|y|) Σ_t m_t ℓ^θ_t``, ``L_base = −log σ(Z_w − Z_l − γ)``;
* weight ``w = sg(σ(−(Z_w − Z_l [− γ])))`` (``weighting="dpo_grad"``, the magnitude of the base loss's gradient,
  large while the pair is mis-ranked) or ``w = 1`` (``weighting="static"``, the paper's ablation);
* regulariser ``L_REG(y) = −β Σ_t m_t r̂_t ℓ^θ_t`` (``token_reduction="sum"``) or
  ``−(β/|y|) Σ_t m_t r̂_t ℓ^θ_t`` (``"mean"``);
* ``L = L_base + α · w · (L_REG(y_w) + L_REG(y_l))``.

The token rewards ``r̂`` are targets: they are detached here and never receive gradient. Any reward source can
feed them once mapped to ``(−½, ½)`` (see :mod:`finegrain.rewards.contrastive`).
"""

from __future__ import annotations

import torch

from finegrain.errors import ConfigError
from finegrain.losses.dpo import PreferenceLossOutput, dpo_loss, simpo_loss
from finegrain.ops.masked import masked_mean, masked_sum, zero_masked

__all__ = ["shared_token_rewards", "treg_loss"]

_BASES = ("dpo", "simpo")
_REDUCTIONS = ("sum", "mean")
_WEIGHTINGS = ("dpo_grad", "static")


def treg_loss(
    pi_w: torch.Tensor,
    ref_w: torch.Tensor | None,
    pi_l: torch.Tensor,
    ref_l: torch.Tensor | None,
    rhat_w: torch.Tensor,
    rhat_l: torch.Tensor,
    mask_w: torch.Tensor,
    mask_l: torch.Tensor,
    beta: float,
    alpha: float,
    base: str = "dpo",
    gamma: float = 0.0,
    token_reduction: str | None = None,
    weighting: str = "dpo_grad",
) -> PreferenceLossOutput:
    """T-REG loss per pair: DPO-REG (``base="dpo"``) or SimPO-REG (``base="simpo"``); docs/methods/treg.md.

    ``L = L_base + α · w · (L_REG(y_w) + L_REG(y_l))`` with the terms defined in the module docstring. For the DPO
    base with ``token_reduction="sum"`` the gradient is (docs/methods/treg.md)
    ``∇L = −β w [Σ_t ∇ℓ^w_t − Σ_t ∇ℓ^l_t] − α β w [Σ_t r̂^w_t ∇ℓ^w_t + Σ_t r̂^l_t ∇ℓ^l_t]``:
    tokens with positive reward get their likelihood raised and negative ones lowered, on both responses.
    With ``α = 0`` or ``r̂ ≡ 0`` the loss is exactly :func:`~finegrain.losses.dpo.dpo_loss` (or
    :func:`~finegrain.losses.dpo.simpo_loss`) on the summed log-probs.

    Args:
        pi_w: ``(B, T_w)`` policy token log-probs ``ℓ^θ_t`` of the chosen responses (labels already gathered).
        ref_w: ``(B, T_w)`` reference token log-probs of the chosen responses; may be None for ``base="simpo"``.
        pi_l: ``(B, T_l)`` policy token log-probs of the rejected responses.
        ref_l: ``(B, T_l)`` reference token log-probs of the rejected responses; None allowed for SimPO.
        rhat_w: ``(B, T_w)`` token rewards of the chosen responses, in ``(−½, ½)`` for the contrastive source.
        rhat_l: ``(B, T_l)`` token rewards of the rejected responses.
        mask_w: ``(B, T_w)`` bool completion mask of the chosen responses; masked positions are inert.
        mask_l: ``(B, T_l)`` bool completion mask of the rejected responses.
        beta: ``β``.
        alpha: ``α ≥ 0``, the regulariser's weight (the paper searches 0.1, 0.25, 0.5).
        base: ``"dpo"`` or ``"simpo"``.
        gamma: SimPO's target margin ``γ`` (ignored for DPO).
        token_reduction: ``"sum"`` or ``"mean"`` over tokens in ``L_REG``; None picks the base's own reduction
            (``"sum"`` for DPO as in docs/methods/treg.md, ``"mean"`` i.e. ``β/|y|`` for SimPO).
        weighting: ``"dpo_grad"`` (``w = sg(σ(−margin))``) or ``"static"`` (``w = 1``).

    Returns:
        :class:`~finegrain.losses.dpo.PreferenceLossOutput` with ``losses (B,)``, the base loss's detached rewards
        ``Z_w``, ``Z_l``, and ``extras``: ``weights`` (``w``), ``reg/chosen`` and ``reg/rejected`` (``L_REG``),
        ``losses/base`` (``L_base``), all ``(B,)`` and detached.

    Raises:
        ConfigError: for an unknown ``base``, ``token_reduction`` or ``weighting``, or a DPO base without
            reference log-probs.

    Example:
        >>> pi, ref = torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.0, -1.0]])
        >>> m, rhat = torch.tensor([[True, True]]), torch.tensor([[0.5, -0.5]])
        >>> out = treg_loss(pi, ref, pi, ref, rhat, rhat, m, m, beta=1.0, alpha=1.0)
        >>> out.losses, out.extras["weights"]
        (tensor([0.6931]), tensor([0.5000]))
    """
    if base not in _BASES:
        raise ConfigError(f"T-REG base must be one of {', '.join(_BASES)}; got {base!r}")
    if token_reduction is None:
        token_reduction = "sum" if base == "dpo" else "mean"
    if token_reduction not in _REDUCTIONS:
        raise ConfigError(f"T-REG token_reduction must be one of {', '.join(_REDUCTIONS)}; got {token_reduction!r}")
    if weighting not in _WEIGHTINGS:
        raise ConfigError(f"T-REG weighting must be one of {', '.join(_WEIGHTINGS)}; got {weighting!r}")
    mask_w, mask_l = mask_w.to(torch.bool), mask_l.to(torch.bool)
    pi_w, pi_l = zero_masked(pi_w, mask_w), zero_masked(pi_l, mask_l)
    rhat_w, rhat_l = zero_masked(rhat_w.detach(), mask_w), zero_masked(rhat_l.detach(), mask_l)

    chosen_logps, rejected_logps = masked_sum(pi_w, mask_w, dim=-1), masked_sum(pi_l, mask_l, dim=-1)
    if base == "dpo":
        if ref_w is None or ref_l is None:
            raise ConfigError("T-REG with base 'dpo' needs reference token log-probs (ref_w, ref_l)")
        out = dpo_loss(
            chosen_logps, rejected_logps, masked_sum(ref_w, mask_w, dim=-1), masked_sum(ref_l, mask_l, dim=-1), beta
        )
    else:
        out = simpo_loss(chosen_logps, rejected_logps, mask_w.sum(-1), mask_l.sum(-1), beta, gamma)
    margin = out.chosen_rewards - out.rejected_rewards - (gamma if base == "simpo" else 0.0)  # x − 0.0 is x
    # w = σ(Z_l − Z_w) is |∂L_base/∂(Z_w − Z_l)|, computed from detached rewards so it carries no gradient.
    weights = torch.sigmoid(-margin) if weighting == "dpo_grad" else torch.ones_like(margin)

    reduce = masked_sum if token_reduction == "sum" else masked_mean
    reg_w = -beta * reduce(rhat_w * pi_w, mask_w, dim=-1)
    reg_l = -beta * reduce(rhat_l * pi_l, mask_l, dim=-1)
    losses = out.losses + alpha * weights * (reg_w + reg_l)
    out.extras = {
        "weights": weights,
        "reg/chosen": reg_w.detach(),
        "reg/rejected": reg_l.detach(),
        "losses/base": out.losses.detach(),
    }
    out.losses = losses
    return out


def shared_token_rewards(
    rhat_w: torch.Tensor,
    rhat_l: torch.Tensor,
    shared_w: torch.Tensor,
    shared_l: torch.Tensor,
    mask_w: torch.Tensor,
    mask_l: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-pair sums of T-REG's token-reward diagnostic: where do the token rewards fall (docs/methods/treg.md)?

    Tokens that the chosen and the rejected response share (the same token, kept by an alignment of the two) carry
    no preference information: DPO's gradient on them cancels between the two responses, and a token reward that
    is not 0 there only adds T-REG's push. With ``S`` the shared and ``D`` the differing tokens of both responses
    of a pair (``shared_*`` and ``mask_* ∧ ¬shared_*``):

    ``sum/shared_reward = Σ_{t∈S} r̂_t``, ``sum/shared_abs_reward = Σ_{t∈S} |r̂_t|``, ``sum/shared_tokens = |S|``,
    the same for ``D`` (``sum/diff_*``), and ``sum/tokens = |S| + |D|``.

    Summed over pairs and divided (``treg/shared_reward = Σ sum/shared_reward / Σ sum/shared_tokens`` ...), they
    give the mean ``r̂`` and ``|r̂|`` per shared and per differing token, and the share of shared tokens.

    Args:
        rhat_w: ``(B, T_w)`` token rewards of the chosen responses.
        rhat_l: ``(B, T_l)`` token rewards of the rejected responses.
        shared_w: ``(B, T_w)`` bool, chosen tokens shared with the rejected response.
        shared_l: ``(B, T_l)`` bool, rejected tokens shared with the chosen response.
        mask_w: ``(B, T_w)`` bool completion mask of the chosen responses; masked positions count nowhere.
        mask_l: ``(B, T_l)`` bool completion mask of the rejected responses.

    Returns:
        ``{name: (B,)}`` detached, for the seven names above.

    Example:
        >>> m = torch.tensor([[True, True, False]])
        >>> out = shared_token_rewards(torch.tensor([[0.2, -0.4, 9.0]]), torch.tensor([[0.1, 0.3, 9.0]]),
        ...                            torch.tensor([[True, False, True]]), torch.tensor([[True, False, False]]), m, m)
        >>> [round(out[k].item(), 4) for k in ("sum/shared_reward", "sum/shared_tokens", "sum/diff_abs_reward")]
        [0.3, 2.0, 0.7]
    """
    out: dict[str, torch.Tensor] = {}
    for name, pick_w, pick_l in (("shared", shared_w, shared_l), ("diff", ~shared_w.to(torch.bool), ~shared_l.to(torch.bool))):
        sel_w = mask_w.to(torch.bool) & pick_w.to(torch.bool)
        sel_l = mask_l.to(torch.bool) & pick_l.to(torch.bool)
        r_w, r_l = zero_masked(rhat_w.detach(), sel_w), zero_masked(rhat_l.detach(), sel_l)
        out[f"sum/{name}_reward"] = r_w.sum(-1) + r_l.sum(-1)
        out[f"sum/{name}_abs_reward"] = r_w.abs().sum(-1) + r_l.abs().sum(-1)
        out[f"sum/{name}_tokens"] = (sel_w.sum(-1) + sel_l.sum(-1)).to(r_w.dtype)
    out["sum/tokens"] = out["sum/shared_tokens"] + out["sum/diff_tokens"]
    return out
