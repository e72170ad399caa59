"""Log-probabilities and entropies from logits, without a second ``(..., V)`` tensor where it can be avoided.

Layout and label shift: finegrain's per-token tensors are in the **response layout** ``(N, T)`` (see
:mod:`finegrain.types`). The logits passed here are the ones computed from the *predicting* states
(:func:`finegrain.models.forward.predicting_states`, i.e. ``hidden[:, P-1 : P-1+T]``), so logits row ``t``
already predicts response token ``t``: ``logits[:, t]`` pairs with ``completion_input_ids[:, t]`` and **no label
shift is applied in this module**. The shift happens once, in the slice taken by ``predicting_states``. (The TDPO
and DPO reference code instead pairs ``logits[:, :-1]`` with ``labels[:, 1:]`` over the whole sequence; the two
agree on every response token.)

When both models' logits would not fit at once, use :mod:`finegrain.ops.chunked`, which starts from hidden
states and never builds ``(N, T, V)`` logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.ops.kl import reverse_kl_from_logps
from finegrain.ops.masked import masked_mean, masked_sum, zero_masked

__all__ = ["selective_log_softmax", "sequence_logps", "token_entropy", "token_logps"]


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits, -1)`` gathered at ``index``, without materialising the full log-softmax.

    Naive equivalent: ``torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)``.

    In float32/float64 this is ``logits[index] - logsumexp(logits)``, with the log-sum-exp taken one leading row
    at a time so that only one row's ``exp`` temporary exists at a time (the TRL formulation). In half precision
    the subtraction would lose the small differences that make up a log-prob, so each leading row is instead
    upcast to float32, passed through ``log_softmax`` and gathered; the result is then float32.

    Args:
        logits: ``(..., V)`` float tensor (e.g. ``(N, T, V)`` in the response layout).
        index: ``(...)`` long tensor of token ids in ``[0, V)`` (the shape of ``logits`` without the last dim).
            Replace ignore markers such as ``-100`` before calling (see :func:`token_logps`).

    Returns:
        ``(...)`` log-probabilities, in the dtype of ``logits`` (float32 for float16/bfloat16 logits).
        Differentiable with respect to ``logits``.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
        >>> selective_log_softmax(logits, torch.tensor([0, 1]))
        tensor([-0.6931, -0.3133])
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"index {tuple(index.shape)} must have the shape of logits {tuple(logits.shape)} without V")
    if logits.dim() == 1:
        return selective_log_softmax(logits.unsqueeze(0), index.unsqueeze(0)).squeeze(0)
    if logits.dtype in (torch.float32, torch.float64):
        selected = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        # One leading row at a time: logsumexp allocates an exp() temporary the size of its input.
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse
    rows = [
        F.log_softmax(row.float(), dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        for row, idx in zip(logits, index)
    ]
    return torch.stack(rows)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities of ``labels`` in the response layout; exactly 0 where ``mask`` is False.

    Naive equivalent: ``log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0] * mask`` with any
    out-of-range label (padding, ``-100``) replaced by 0 first. No label shift: ``logits[:, t]`` predicts
    ``labels[:, t]`` (see the module docstring).

    Args:
        logits: ``(N, T, V)`` float, the logits of the predicting states.
        labels: ``(N, T)`` long, the response token ids (any value where ``mask`` is False).
        mask: ``(N, T)`` bool, True on response tokens (``completion_mask``).

    Returns:
        ``(N, T)`` log-probabilities (float32 for half-precision logits).

    Example:
        >>> logits = torch.zeros(1, 2, 4)
        >>> token_logps(logits, torch.tensor([[3, -100]]), torch.tensor([[True, False]]))
        tensor([[-1.3863,  0.0000]])
    """
    return zero_masked(selective_log_softmax(logits, zero_masked(labels, mask)), mask)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of per-token log-probabilities over the response tokens of each row.

    ``Σ_t m_t ℓ_t`` (DPO, TDPO) or ``(1/|y|) Σ_t m_t ℓ_t`` (SimPO, ``average=True``; an empty row gives 0).
    Naive equivalent: ``(token_logps * mask).sum(-1)`` (``/ mask.sum(-1)``).

    Args:
        token_logps: ``(N, T)`` float.
        mask: ``(N, T)`` bool.
        average: divide by the number of response tokens.

    Returns:
        ``(N,)`` float.

    Example:
        >>> sequence_logps(torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[True, True, False]]))
        tensor([-3.])
    """
    if average:
        return masked_mean(token_logps, mask, dim=-1)
    return masked_sum(token_logps, mask, dim=-1)


def token_entropy(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy ``H(p_t) = -Σ_v p_t(v) log p_t(v)`` of the predictive distribution at every position.

    Computed over chunks of ``chunk_size`` flattened rows, so the ``softmax`` / ``log_softmax`` temporaries are
    ``(chunk_size, V)`` rather than ``(N, T, V)``. Terms with ``p = 0`` count as 0 (the limit of ``p log p``),
    so logits of ``-inf`` (banned tokens) give a finite entropy rather than NaN.
    Naive equivalent: ``-(softmax(z) * log_softmax(z)).sum(-1)``.

    Args:
        logits: ``(..., V)`` float.
        chunk_size: rows per chunk.

    Returns:
        ``(...)`` entropies in nats (float32 for half-precision logits). Differentiable.

    Example:
        >>> token_entropy(torch.zeros(2, 4))
        tensor([1.3863, 1.3863])
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shape, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    out = []
    for chunk in flat.split(chunk_size, dim=0):
        if chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.float()
        # H(p) = −Σ p (log p − log 1), with reverse_kl_from_logps's rule that terms with p = 0 count as 0
        out.append(-reverse_kl_from_logps(F.log_softmax(chunk, dim=-1), chunk.new_zeros(())))
    return torch.cat(out).reshape(shape)
