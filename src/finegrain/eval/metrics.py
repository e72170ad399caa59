"""Evaluation metrics: pure functions on arrays and tensors (numpy and torch only).

Sampling, judging and file output live in the ``finegrain eval`` command; everything that turns numbers
into a metric is here, so that each metric is tested against a hand-computed or naive value.

Conventions: per-token inputs are ``(N, T)`` tensors aligned with the response tokens, with a
``response_mask`` ``(N, T)`` (bool or 0/1) marking the tokens that count. Per-response and pooled inputs
are 1-D array-likes (lists, numpy arrays or CPU/GPU tensors).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from finegrain.errors import DataError, NonFiniteError
from finegrain.ops.logprobs import token_entropy
from finegrain.ops.masked import masked_mean, masked_sum


def _float64(x, name: str | None = None) -> np.ndarray:
    """A float64 numpy copy of ``x`` (list, numpy array or tensor on any device); with a ``name``, ``x`` must
    be 1-D (the error names it)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if name is not None and arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    return arr


# --------------------------------------------------------------------------------- sequence-level comparisons


@dataclass(frozen=True)
class WinRate:
    """Outcome rates of paired comparisons of a policy against a reference.

    ``win + tie + loss == 1``. ``win`` is the strict win rate (ties are reported apart, in ``tie``); this is
    the ``win_rate`` of ``eval.json``, and ``tie`` its ``tie_rate``. ``win_incl_half_ties`` is the
    combined rate that counts a tie as half a win, ``win + tie / 2`` (0.5 for a policy identical to its
    reference).
    """

    win: float
    tie: float
    loss: float
    n: int

    @property
    def win_incl_half_ties(self) -> float:
        """``win + tie / 2``: the win rate with each tie counted as half a win."""
        return self.win + 0.5 * self.tie


def win_rate(rewards, ref_rewards, tol: float = 0.0) -> WinRate:
    """Win, tie and loss rates of a policy against a reference, prompt by prompt.

    With ``Δ_i = rewards[i] - ref_rewards[i]`` (both judged on the same prompt i):
    ``win = mean(Δ_i > tol)``, ``tie = mean(|Δ_i| <= tol)``, ``loss = mean(Δ_i < -tol)``.

    Args:
        rewards: ``(N,)`` judge scores of the policy's responses.
        ref_rewards: ``(N,)`` judge scores of the reference's responses to the same prompts.
        tol: non-negative tie tolerance; ``tol=0`` counts only exact equality as a tie (discrete judges).

    Returns:
        A :class:`WinRate` with the three rates and ``n = N``.

    Raises:
        ValueError: on mismatched shapes, an empty input or a negative ``tol``.
        NonFiniteError: if a score is NaN (a NaN comparison is neither win, tie nor loss).
    """
    r = _float64(rewards, "rewards")
    r_ref = _float64(ref_rewards, "ref_rewards")
    if r.shape != r_ref.shape:
        raise ValueError(f"rewards {r.shape} and ref_rewards {r_ref.shape} must have the same shape")
    if r.size == 0:
        raise ValueError("win_rate needs at least one paired comparison")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    delta = r - r_ref
    if np.isnan(delta).any():
        raise NonFiniteError(f"win_rate: {int(np.isnan(delta).sum())} NaN score difference(s)")
    n = r.size
    wins = int((delta > tol).sum())
    losses = int((delta < -tol).sum())
    ties = n - wins - losses
    return WinRate(win=wins / n, tie=ties / n, loss=losses / n, n=n)


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean and standard error of the mean.

    ``mean = Σ x_i / n``; ``stderr = s / sqrt(n)`` with the sample standard deviation
    ``s = sqrt(Σ (x_i - mean)² / (n - 1))``. The standard error is NaN for a single value (undefined).

    Args:
        values: ``(n,)`` numbers, n >= 1.

    Returns:
        ``(mean, stderr)`` as Python floats.
    """
    x = _float64(values, "values")
    if x.size == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan
    return mean, float(x.std(ddof=1) / math.sqrt(x.size))


# ----------------------------------------------------------------------------- ranking metrics (token credit)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` in ascending order, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    # A group of c tied values occupying ranks (end - c + 1) .. end gets their mean, end - (c - 1) / 2.
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _scores_and_labels(scores, labels, caller: str) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, labels != 0)`` as 1-D numpy arrays of one shape, with no NaN score."""
    s = _float64(scores, "scores")
    y = _float64(labels, "labels") != 0
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must have the same shape")
    if np.isnan(s).any():
        raise NonFiniteError(f"{caller}: {int(np.isnan(s).sum())} NaN score(s)")
    return s, y


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for the binary ``labels``, by ranks.

    ``AUROC = (R_+ - n_+ (n_+ + 1) / 2) / (n_+ · n_-)`` where ``R_+`` is the sum of the (1-based,
    ascending, tie-averaged) ranks of the positives. This is the Mann–Whitney ``U`` over ``n_+ · n_-``,
    i.e. the probability that a random positive scores above a random negative, ties counting 1/2:
    ``(1 / (n_+ n_-)) Σ_{i∈+} Σ_{j∈-} ([s_i > s_j] + ½ [s_i = s_j])``. O(n log n).

    Args:
        scores: ``(n,)`` real scores, higher meaning "more positive"; ±inf is allowed, NaN is not.
        labels: ``(n,)`` booleans or 0/1 (1 = positive).

    Returns:
        The AUROC in [0, 1]; NaN when either class is empty (the AUROC is undefined there).

    Raises:
        NonFiniteError: if a score is NaN.
    """
    s, y = _scores_and_labels(scores, labels, "auroc")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(_average_ranks(s)[y].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def precision_at_k(scores, labels, k: int) -> float:
    """Fraction of the ``k`` highest-scoring items that are positive.

    ``P@k = |{top-k by score} ∩ positives| / k``. When the k-th score is tied with items outside the
    top k, the tied group fills the remaining slots in proportion to its positives, which is the expected
    precision under a uniformly random tie-break (so a constant scorer gets the base rate, whatever the
    input order): with ``a`` positives among the ``m`` items scoring strictly above the k-th score, and
    ``p`` positives among the ``g`` items tied with it, ``P@k = (a + (k - m) · p / g) / k``.

    Args:
        scores: ``(n,)`` real scores (NaN not allowed).
        labels: ``(n,)`` booleans or 0/1 (1 = positive).
        k: number of top items, ``1 <= k <= n``.

    Returns:
        The precision in [0, 1].
    """
    s, y = _scores_and_labels(scores, labels, "precision_at_k")
    if not 1 <= k <= s.size:
        raise ValueError(f"k must be in [1, {s.size}], got {k}")
    kth = np.sort(s)[::-1][k - 1]
    above = s > kth
    tied = s == kth
    m, a = int(above.sum()), int(y[above].sum())
    g, p = int(tied.sum()), int(y[tied].sum())
    return (a + (k - m) * p / g) / k


@dataclass(frozen=True)
class TokenCreditResult:
    """How well a token reward source ranks tokens by their ground-truth credit (pooled over responses).

    Attributes:
        auroc: AUROC of the scores for positive-versus-negative credit tokens (NaN if a class is empty).
        precision_at_k: fraction of the ``k`` highest-scored tokens whose credit is positive.
        k: the ``k`` used (by default ``n_pos``, which makes ``precision_at_k`` the R-precision).
        n_pos: tokens with credit > eps.
        n_neg: tokens with credit < -eps.
        n_neutral: tokens with |credit| <= eps, left out of both metrics.
    """

    auroc: float
    precision_at_k: float
    k: int
    n_pos: int
    n_neg: int
    n_neutral: int


def _pool_tokens(values, mask, name: str) -> list[np.ndarray]:
    """Per-response 1-D arrays from an ``(N, T)`` tensor/array with a mask, or from a ragged list."""
    if isinstance(values, (torch.Tensor, np.ndarray)) and np.ndim(values) == 2:
        values = _float64(values)
        mask = np.ones(values.shape, dtype=bool) if mask is None else _float64(mask) != 0
        if mask.shape != values.shape:
            raise ValueError(f"mask {mask.shape} and {name} {values.shape} must have the same shape")
        return [row[m] for row, m in zip(values, mask)]
    if mask is not None:
        raise ValueError(f"a mask is only accepted with a 2-D {name} tensor or array")
    return [_float64(row, f"{name}[{i}]") for i, row in enumerate(values)]


def evaluate_token_credit(
    scores,
    credit,
    response_mask=None,
    k: int | None = None,
    eps: float = 1e-6,
) -> TokenCreditResult:
    """Token-credit AUROC and precision@k of a reward source against ground-truth credit.

    Every response token is an item; tokens of all responses are pooled. The positive class is
    ``credit > eps`` (tokens that made the response better), the negative class ``credit < -eps`` (tokens
    that made it worse); neutral tokens, ``|credit| <= eps``, are excluded from both metrics, because
    ground truth says nothing about how they should rank. Then
    ``auroc = AUROC(scores | credit ≠ 0, credit > 0)`` and
    ``precision_at_k = P@k(scores | credit ≠ 0, credit > 0)`` (see :func:`auroc`, :func:`precision_at_k`).

    Args:
        scores: per-token rewards of the source, either ``(N, T)`` (tensor or array; with
            ``response_mask``) or a list of N 1-D sequences (ragged, one per response).
        credit: ground-truth credit, in the same layout as ``scores``.
        response_mask: ``(N, T)`` tokens that count, for the 2-D layout only (None = all).
        k: tokens in the top-k; default ``n_pos`` (R-precision). Clamped to the number of non-neutral
            tokens.
        eps: neutral band half-width.

    Returns:
        A :class:`TokenCreditResult`.

    Raises:
        DataError: when a response's scores and credit have different lengths (``row`` names it).
        NonFiniteError: on a NaN score or credit.
    """
    score_rows = _pool_tokens(scores, response_mask, "scores")
    credit_rows = _pool_tokens(credit, response_mask, "credit")
    if len(score_rows) != len(credit_rows):
        raise ValueError(f"{len(score_rows)} score rows but {len(credit_rows)} credit rows")
    for i, (s_row, c_row) in enumerate(zip(score_rows, credit_rows)):
        if s_row.shape != c_row.shape:
            raise DataError(f"{s_row.size} scores for {c_row.size} credit values", source="token credit",
                            row=i, field="scores")
    s = np.concatenate(score_rows) if score_rows else np.zeros(0)
    c = np.concatenate(credit_rows) if credit_rows else np.zeros(0)
    if np.isnan(c).any():
        raise NonFiniteError(f"evaluate_token_credit: {int(np.isnan(c).sum())} NaN credit value(s)")
    positive, negative = c > eps, c < -eps
    keep = positive | negative
    n_pos, n_neg = int(positive.sum()), int(negative.sum())
    s_kept, y_kept = s[keep], positive[keep]
    n_kept = int(keep.sum())
    k = min(n_pos if k is None else k, n_kept)
    p_at_k = precision_at_k(s_kept, y_kept, k) if k >= 1 else math.nan
    return TokenCreditResult(auroc=auroc(s_kept, y_kept), precision_at_k=p_at_k, k=k, n_pos=n_pos,
                             n_neg=n_neg, n_neutral=int(c.size - n_kept))


# ------------------------------------------------------------------------ per-token statistics of generations


def response_entropy(
    logits: torch.Tensor, response_mask: torch.Tensor, chunk_size: int = 128
) -> torch.Tensor:
    """Mean per-token predictive entropy of each response, ``H̄_i = Σ_t m_it H_it / Σ_t m_it``.

    ``H_it = -Σ_v p_it(v) log p_it(v)`` with ``p_it = softmax(logits[i, t])`` is the entropy of the
    distribution that generated response token t (:func:`finegrain.ops.logprobs.token_entropy`, chunked so
    only ``(chunk_size, V)`` temporaries exist); an empty response gets 0. No gradient is recorded.

    Args:
        logits: ``(N, T, V)`` logits in the response layout (row t predicts response token t).
        response_mask: ``(N, T)`` bool or 0/1.
        chunk_size: flattened positions per chunk.

    Returns:
        ``(N,)`` entropies in nats (float32 for half-precision logits).
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (N, T, V), got shape {tuple(logits.shape)}")
    with torch.no_grad():
        entropy = token_entropy(logits, chunk_size)
    return masked_mean(entropy, response_mask.to(logits.device), dim=-1)


def mean_token_entropy(logits: torch.Tensor, response_mask: torch.Tensor, chunk_size: int = 128) -> float:
    """The ``entropy`` of ``eval.json``: masked mean entropy per response, then the mean over responses.

    ``entropy = (1 / |R|) Σ_{i∈R} H̄_i`` with ``R`` the non-empty responses (an empty response has no
    entropy and is left out rather than counted as 0). Each response weighs the same, whatever its length.

    Args:
        logits: ``(N, T, V)``.
        response_mask: ``(N, T)``.
        chunk_size: flattened positions per chunk.

    Returns:
        A Python float (NaN if every response is empty).
    """
    per_response = response_entropy(logits, response_mask, chunk_size)
    nonempty = response_mask.to(torch.bool).any(dim=-1).to(per_response.device)
    if not bool(nonempty.any()):
        return math.nan
    return float(per_response[nonempty].mean())


def sequential_kl(token_kl: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sequential KL of each response: ``KL_seq(i) = Σ_t m_it · kl_it``.

    ``kl_it`` is a per-token KL(policy || reference) at the position that generated token t (the exact
    full-vocabulary KL, or an estimator such as k1 = ``log π(y_t) - log π_ref(y_t)``); its sum over the
    response is the KL between the two sequence distributions for the exact per-token KL (chain rule). The
    ``seq_kl`` of ``eval.json`` is the mean of this over responses.

    Args:
        token_kl: ``(N, T)`` per-token KL.
        response_mask: ``(N, T)`` bool or 0/1; masked positions are ignored even if non-finite.

    Returns:
        ``(N,)`` in the dtype of ``token_kl``.
    """
    if token_kl.shape != response_mask.shape:
        raise ValueError(
            f"token_kl {tuple(token_kl.shape)} and response_mask {tuple(response_mask.shape)} differ"
        )
    return masked_sum(token_kl, response_mask, dim=-1)


def response_length(response_mask: torch.Tensor) -> torch.Tensor:
    """Length of each response in tokens, ``L_i = Σ_t m_it``.

    Args:
        response_mask: ``(N, T)`` bool or 0/1.

    Returns:
        ``(N,)`` int64.
    """
    return response_mask.to(torch.bool).sum(dim=-1)


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Corpus-level distinct-n: distinct n-grams over all n-grams, pooled over the sequences.

    ``distinct_n = |∪_i G_n(y_i)| / Σ_i max(len(y_i) - n + 1, 0)`` where ``G_n(y)`` is the set of n-grams of
    ``y`` (contiguous, within one sequence). Li et al. (2016) divide by the number of tokens instead; the
    n-gram count used here makes 1.0 mean "no n-gram repeated" for every n.

    Args:
        sequences: token sequences (ids or strings).
        n: n-gram order, >= 1.

    Returns:
        The ratio in [0, 1]; 0.0 when no sequence has n tokens.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple] = set()
    total = 0
    for seq in sequences:
        seq = list(seq.tolist() if isinstance(seq, (torch.Tensor, np.ndarray)) else seq)
        for j in range(len(seq) - n + 1):
            seen.add(tuple(seq[j : j + n]))
            total += 1
    return len(seen) / total if total else 0.0
