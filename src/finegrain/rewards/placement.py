"""Placement of scores on response tokens: the one place where scalars and span values become ``(B, T)`` rewards.

* :func:`place_on_last_token`: a sequence score goes to the last valid response token (sequence RMs,
  the minimal-edit and PPO baselines; the usual RLHF convention, e.g. verl ``compute_rewards``).
* :func:`place_at_span_ends`: one value per span goes to the span's last token (SRM dense rewards, Qiu et al.
  2025, arXiv 2503.04793: ``a_j s_j`` on the last policy token of sentence ``j``; docs/methods/reward-models.md).
* :func:`spread_over_spans`: one value per span is spread uniformly over the span's tokens (the ``spread`` option,
  our choice, not in SRM: ``a_j s_j / |sent_j|`` on each token of sentence ``j``; docs/methods/reward-models.md).

All functions are vectorised over the batch, keep gradients with respect to the values, return the dtype of the
values, and put exactly 0 wherever ``mask`` is False (the :class:`finegrain.types.TokenRewards` contract).
"""

from __future__ import annotations

import torch

from finegrain.errors import DataError
from finegrain.ops.masked import last_token_index


def place_on_last_token(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each row's scalar score on its last valid response token.

    ``out[b, t] = scores[b]`` if ``t`` is the last index with ``mask[b, t]``, else 0. A row without any valid token
    gets all zeros (its score has nowhere to go).

    Args:
        scores: ``(B,)`` float sequence scores.
        mask: ``(B, T)`` bool response mask.

    Returns:
        ``(B, T)`` tensor of the dtype of ``scores``.

    Example:
        >>> place_on_last_token(torch.tensor([2., 5.]), torch.tensor([[1, 1, 0], [1, 1, 1]]))
        tensor([[0., 2., 0.],
                [0., 0., 5.]])
    """
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise DataError(f"scores {tuple(scores.shape)} must be (B,) for a mask of {tuple(mask.shape)}")
    last = last_token_index(mask)
    positions = torch.arange(mask.shape[1], device=mask.device)
    at_last = positions.unsqueeze(0) == last.unsqueeze(1)  # never true for last = -1
    return torch.where(at_last, scores.unsqueeze(1), torch.zeros((), dtype=scores.dtype, device=scores.device))


def place_at_span_ends(span_values: torch.Tensor, span_ends: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each span's value on the span's last token: ``out[b, span_ends[b, j]] += span_values[b, j]``.

    Spans with ``span_ends == -1`` are padding and ignored. Two spans ending on the same token add up. For SRM
    dense rewards pass the response sentences' terms ``a_j s_j`` (``j >= 1``) and their last tokens; the prompt
    term ``a_0 s_0`` has no response token and is dropped (as in the SRM code; docs/methods/reward-models.md).

    Args:
        span_values: ``(B, S)`` float, one value per span (padding entries are ignored).
        span_ends: ``(B, S)`` long, the response index of each span's last token, -1 for padding.
        mask: ``(B, T)`` bool response mask.

    Returns:
        ``(B, T)`` tensor of the dtype of ``span_values``, 0 off the span ends.

    Raises:
        DataError: shapes differ, or an end lies outside ``[-1, T)`` or on a masked-out token.

    Example:
        >>> place_at_span_ends(torch.tensor([[1., 2.]]), torch.tensor([[1, 3]]), torch.ones(1, 4, dtype=torch.bool))
        tensor([[0., 1., 0., 2.]])
    """
    if span_values.shape != span_ends.shape or span_values.dim() != 2 or span_values.shape[0] != mask.shape[0]:
        raise DataError(
            f"span_values {tuple(span_values.shape)} and span_ends {tuple(span_ends.shape)} must both be (B, S) "
            f"with B = {mask.shape[0]}"
        )
    T = mask.shape[1]
    if span_ends.numel() and (int(span_ends.min()) < -1 or int(span_ends.max()) >= T):
        raise DataError(f"span ends must lie in [-1, {T}) (-1 = padding), got {span_ends.tolist()}")
    valid = span_ends >= 0
    index = span_ends.clamp(min=0)
    if not bool(mask.to(torch.bool).gather(1, index)[valid].all()):
        raise DataError("a span ends on a masked-out (padding) response token")
    values = torch.where(valid, span_values, torch.zeros((), dtype=span_values.dtype, device=span_values.device))
    out = torch.zeros(mask.shape, dtype=span_values.dtype, device=span_values.device)
    return out.scatter_add(1, index, values)


def spread_over_spans(span_values: torch.Tensor, token_span_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spread each span's value uniformly over its tokens: ``out[b, t] = v[b, j] / |{t' : id[b, t'] = j}|``.

    ``j = token_span_ids[b, t]``; tokens with id -1 (between spans) or masked out get 0 and do not count. A span
    with no valid token cannot carry its value, which is then dropped.

    Args:
        span_values: ``(B, S)`` float, one value per span.
        token_span_ids: ``(B, T)`` long, the span of each token in ``[-1, S)``, -1 for none
            (e.g. from :func:`finegrain.data.segmentation.token_sentence_ids`).
        mask: ``(B, T)`` bool response mask.

    Returns:
        ``(B, T)`` tensor of the dtype of ``span_values``; each span's tokens sum to its value.

    Raises:
        DataError: shapes differ or an id lies outside ``[-1, S)``.

    Example:
        >>> spread_over_spans(torch.tensor([[3., 1.]]), torch.tensor([[0, 0, 0, -1, 1]]), torch.ones(1, 5).bool())
        tensor([[1., 1., 1., 0., 1.]])
    """
    if token_span_ids.shape != mask.shape or span_values.dim() != 2 or span_values.shape[0] != mask.shape[0]:
        raise DataError(
            f"token_span_ids {tuple(token_span_ids.shape)} must match the mask {tuple(mask.shape)} and "
            f"span_values {tuple(span_values.shape)} must be (B, S)"
        )
    S = span_values.shape[1]
    if token_span_ids.numel() and (int(token_span_ids.min()) < -1 or int(token_span_ids.max()) >= S):
        raise DataError(f"token span ids must lie in [-1, {S}) (-1 = no span)")
    if S == 0:
        return torch.zeros(mask.shape, dtype=span_values.dtype, device=span_values.device)
    valid = (token_span_ids >= 0) & mask.to(torch.bool)
    index = token_span_ids.clamp(min=0)
    counts = torch.zeros_like(span_values).scatter_add(1, index, valid.to(span_values.dtype))
    per_token = span_values.gather(1, index) / counts.gather(1, index).clamp(min=1.0)
    return torch.where(valid, per_token, torch.zeros((), dtype=span_values.dtype, device=span_values.device))
