"""Masked reductions with clamped denominators.

Every reduction over tokens in finegrain goes through these functions so that an all-masked row or batch
yields 0 instead of NaN. ``mask`` is a bool or 0/1 float tensor broadcastable to ``values``.
"""

from __future__ import annotations

import torch


def zero_masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask`` is set, exactly 0 elsewhere.

    Naive equivalent: ``values * mask``, except that it is a ``torch.where``, so NaN or inf at masked
    positions cannot survive (nor reach a gradient). The result has the dtype of ``values``.

    Example:
        >>> zero_masked(torch.tensor([[1., float("nan")]]), torch.tensor([[True, False]]))
        tensor([[1., 0.]])
    """
    return torch.where(mask.to(torch.bool), values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is set.

    Naive equivalent: ``sum(v for v, m in zip(values, mask) if m)``. Masked entries are replaced by zero
    with ``torch.where`` (not multiplied), so NaN or inf at masked positions cannot leak into the result.

    Args:
        values: ``(..., T)`` float tensor.
        mask: same shape (bool or 0/1).
        dim: dimension to reduce; ``None`` reduces everything.

    Returns:
        The masked sum, shape of ``values`` without ``dim`` (a scalar if ``dim`` is None).

    Example:
        >>> masked_sum(torch.tensor([[1., 2., 3.]]), torch.tensor([[1, 0, 1]]), dim=-1)
        tensor([4.])
    """
    zeroed = zero_masked(values, mask)
    return zeroed.sum() if dim is None else zeroed.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is set; 0 where no position is set.

    Naive equivalent: ``masked_sum(values, mask, dim) / max(mask.sum(dim), 1)``.

    Example:
        >>> masked_mean(torch.tensor([[1., 2., 3.], [4., 5., 6.]]), torch.tensor([[1, 0, 1], [0, 0, 0]]), dim=-1)
        tensor([2., 0.])
    """
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over all masked-in positions (a scalar).

    Naive equivalent: ``torch.var(values[mask], unbiased=unbiased)``; returns 0 when fewer than two
    positions are set (instead of NaN).
    """
    mean = masked_mean(values, mask)
    count = mask.to(values.dtype).sum()
    total = masked_sum((values - mean) ** 2, mask)
    if unbiased:
        return torch.where(count > 1, total / (count - 1).clamp(min=1.0), torch.zeros_like(total))
    return total / count.clamp(min=1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``values`` to zero mean and unit variance over the masked-in positions.

    Naive equivalent: ``(v - v[mask].mean()) / sqrt(v[mask].var() + eps)``; with ``shift_mean=False`` the
    mean is added back (PPO's reward whitening keeps the mean). Masked positions are returned as 0.

    Args:
        values: float tensor of any shape.
        mask: same shape.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance.

    Returns:
        Tensor of the shape of ``values``.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_masked(whitened, mask)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True position of each row, -1 for an all-False row.

    Args:
        mask: ``(B, T)`` bool (or 0/1) response mask.

    Returns:
        ``(B,)`` long.

    Example:
        >>> last_token_index(torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]]))
        tensor([ 1, -1,  2])
    """
    mask = mask.to(torch.bool)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
