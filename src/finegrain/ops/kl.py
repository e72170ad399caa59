"""Per-token KL estimators for the KL penalty of online RL (``KLterm_t`` in docs/methods/ppo.md).

Notation (that of docs/methods/ppo.md): ``ρ_t = ℓ^θ_t − ℓ^ref_t``, with ``ℓ_t = log π(y_t | s_t)``, is the
log-ratio of the *sampled* token ``y_t`` under the policy and the reference. With ``y_t ~ π_θ`` the
sampled-token estimators of the reverse KL ``KL(π_θ ‖ π_ref)`` are (J. Schulman, "Approximating KL divergence",
2020, with ``r = π_ref/π_θ = e^{−ρ}``):

* ``k1 = −log r = ρ``                 unbiased, high variance, can be negative;
* ``k2 = (log r)²/2 = ρ²/2``          biased (exact to second order), non-negative;
* ``k3 = (r − 1) − log r = e^{−ρ} − 1 + ρ``   unbiased, non-negative.

The full-vocabulary reverse KL ``K̃_t = KL(p^θ_t ‖ p^ref_t) = Σ_v p^θ_t(v) (log p^θ_t(v) − log p^ref_t(v))``
(the ``--penalty full_kl`` of TLCR's official PPO script; Yoon et al., Findings of ACL 2024, arXiv 2407.16574)
needs the logits of both models at the predicting positions.
The *forward* KL ``K_t = KL(p^ref ‖ p^θ)`` of TDPO lives in :mod:`finegrain.ops.chunked`.

All per-token tensors are in the response layout ``(N, T)`` of :mod:`finegrain.types`. This module imports
only torch (and :mod:`finegrain.ops.masked`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.ops.masked import zero_masked

__all__ = [
    "KL_ESTIMATORS",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "reverse_kl_from_logits",
    "reverse_kl_from_logps",
]

KL_ESTIMATORS = ("k1", "k2", "k3", "full")


def _log_ratio(token_logps: torch.Tensor, ref_token_logps: torch.Tensor) -> torch.Tensor:
    if token_logps.shape != ref_token_logps.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and ref_token_logps {tuple(ref_token_logps.shape)} differ"
        )
    return token_logps - ref_token_logps


def kl_k1(token_logps: torch.Tensor, ref_token_logps: torch.Tensor) -> torch.Tensor:
    """k1 estimator ``ρ_t = ℓ^θ_t − ℓ^ref_t`` (Schulman 2020; the ``−c_KL·ρ_t`` penalty of standard RLHF PPO).

    Args:
        token_logps: ``(N, T)`` policy log-probs of the sampled tokens.
        ref_token_logps: ``(N, T)`` reference log-probs of the same tokens.

    Returns:
        ``(N, T)`` per-token estimate (may be negative).

    Example:
        >>> kl_k1(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]))
        tensor([[ 0.5000, -1.0000]])
    """
    return _log_ratio(token_logps, ref_token_logps)


def kl_k2(token_logps: torch.Tensor, ref_token_logps: torch.Tensor) -> torch.Tensor:
    """k2 estimator ``ρ_t² / 2`` (Schulman 2020): biased, non-negative, low variance.

    Arguments and shapes as :func:`kl_k1`; the ``(N, T)`` estimate is ``>= 0``.

    Example:
        >>> kl_k2(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]))
        tensor([[0.1250, 0.5000]])
    """
    return 0.5 * _log_ratio(token_logps, ref_token_logps).square()


def kl_k3(token_logps: torch.Tensor, ref_token_logps: torch.Tensor) -> torch.Tensor:
    """k3 estimator ``e^{−ρ_t} − 1 + ρ_t`` (Schulman 2020): unbiased for ``KL(π_θ ‖ π_ref)`` and non-negative.

    Computed as ``expm1(−ρ) + ρ``: ``expm1`` keeps the small values near ``ρ = 0`` that ``exp(−ρ) − 1`` rounds
    away, and ``expm1(x) >= x`` holds in floating point too, so the result is never negative. ``e^{−ρ}``
    overflows for ``ρ ≲ −88`` in float32; clamp ``ρ`` upstream (e.g. ``kl_penalty(..., log_ratio_clip=10)``)
    if the policy can drift that far. Arguments and shapes as :func:`kl_k1`; the ``(N, T)`` estimate is
    ``>= 0``.

    Example:
        >>> kl_k3(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -1.0]]))
        tensor([[0.0000, 0.7183]])
    """
    rho = _log_ratio(token_logps, ref_token_logps)
    return (torch.expm1(-rho) + rho).clamp(min=0.0)


def reverse_kl_from_logps(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary reverse KL ``Σ_v p(v) (log p(v) − log q(v))`` from two normalised log-distributions.

    Naive equivalent: ``(logps.exp() * (logps - ref_logps)).sum(-1)``. Terms with ``p(v) = 0`` count as 0
    (the limit of ``p log p``), so a policy that bans a token (``−inf`` logit) gives a finite KL, not NaN.

    Args:
        logps: ``(..., V)`` policy ``log_softmax`` (float32 or float64).
        ref_logps: ``(..., V)`` reference ``log_softmax``, same shape.

    Returns:
        ``(...)`` KL in nats, ``>= 0`` up to rounding. Differentiable with respect to both inputs.
    """
    p = logps.exp()
    return (p * zero_masked(logps - ref_logps, p > 0)).sum(dim=-1)


def reverse_kl_from_logits(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-position ``K̃_t = KL(p^θ_t ‖ p^ref_t)`` over the full vocabulary (TLCR's penalty, docs/methods/ppo.md).

    ``K̃_t = Σ_v softmax(z^θ_t)(v) · (log_softmax(z^θ_t)(v) − log_softmax(z^ref_t)(v))``, with both
    ``log_softmax`` taken in float32 (half-precision logits are upcast; float64 stays float64), never
    ``softmax().log()``. The logits are those of the *predicting* states
    (:func:`finegrain.models.forward.predicting_states`), so row ``t`` is the distribution the action ``y_t``
    was drawn from. This builds ``(N, T, V)`` temporaries: pass row chunks (as :mod:`finegrain.rl.rollout`
    does) when ``N·T·V`` is large.

    Args:
        policy_logits: ``(N, T, V)`` policy logits.
        ref_logits: ``(N, T, V)`` reference logits.
        mask: optional ``(N, T)`` bool; the KL is set to exactly 0 where it is False.

    Returns:
        ``(N, T)`` float32 (or float64) KL in nats, ``>= 0`` up to rounding.

    Example:
        >>> z = torch.tensor([[[0.0, 0.0]]])
        >>> reverse_kl_from_logits(z, torch.tensor([[[0.0, 2.0]]]))
        tensor([[0.4338]])
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy_logits {tuple(policy_logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ"
        )
    dtype = torch.float64 if policy_logits.dtype == torch.float64 else torch.float32
    logps = F.log_softmax(policy_logits.to(dtype), dim=-1)
    ref_logps = F.log_softmax(ref_logits.to(dtype), dim=-1)
    kl = reverse_kl_from_logps(logps, ref_logps)
    if mask is not None:
        kl = zero_masked(kl, mask)
    return kl


def kl_penalty(
    token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    estimator: str = "k1",
    mask: torch.Tensor | None = None,
    *,
    log_ratio_clip: float | None = None,
    policy_logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    full_kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-token KL term ``KLterm_t`` of the dense reward ``R_t = c·r_t − c_KL·KLterm_t`` (docs/methods/ppo.md).

    ``estimator``: ``"k1"`` → ``ρ_t``; ``"k2"`` → ``ρ_t²/2``; ``"k3"`` → ``e^{−ρ_t} − 1 + ρ_t``;
    ``"full"`` → ``K̃_t = KL(p^θ_t ‖ p^ref_t)`` over the vocabulary, taken from ``full_kl`` when given (e.g.
    computed in chunks at rollout time by :func:`finegrain.rl.rollout.score_rollout`), else from
    ``policy_logits`` and ``ref_logits``.

    Args:
        token_logps: ``(N, T)`` policy log-probs of the sampled tokens (unused for ``"full"``; may be None then).
        ref_token_logps: ``(N, T)`` reference log-probs (unused for ``"full"``; may be None then).
        estimator: one of ``KL_ESTIMATORS``.
        mask: optional ``(N, T)`` bool ``response_mask``; the result is exactly 0 where False.
        log_ratio_clip: clamp ``ρ_t`` to ``[−c, c]`` before k1/k2/k3 (guards ``e^{−ρ}`` in k3 against overflow).
        policy_logits: ``(N, T, V)`` policy logits, for ``"full"`` without ``full_kl``.
        ref_logits: ``(N, T, V)`` reference logits, for ``"full"`` without ``full_kl``.
        full_kl: ``(N, T)`` precomputed ``K̃_t``, for ``"full"``.

    Returns:
        ``(N, T)`` KL term (not yet multiplied by ``c_KL``).

    Example:
        >>> lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
        >>> kl_penalty(lp, ref, "k2", mask=torch.tensor([[True, False]]))
        tensor([[0.1250, 0.0000]])
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    if estimator == "full":
        if full_kl is not None:
            kl = full_kl
        elif policy_logits is not None and ref_logits is not None:
            kl = reverse_kl_from_logits(policy_logits, ref_logits)
        else:
            raise ValueError("estimator 'full' needs full_kl, or both policy_logits and ref_logits")
    else:
        rho = _log_ratio(token_logps, ref_token_logps)
        if log_ratio_clip is not None:
            rho = rho.clamp(-log_ratio_clip, log_ratio_clip)
        kl = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}[estimator](rho, torch.zeros_like(rho))  # ρ − 0 is ρ
    if mask is not None:
        kl = zero_masked(kl, mask)
    return kl
