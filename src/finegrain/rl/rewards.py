"""The per-action reward of online RL, built from any mix of reward sources (docs/methods/ppo.md).

``R_t = Σ_s c_s·values_s[t] (+ c_s·seq_reward_s on the last valid token) − c_KL·KLterm_t``, where every source ``s``
returns a :class:`finegrain.types.TokenRewards` aligned with the policy's response tokens and the KL term comes from
:func:`finegrain.ops.kl.kl_penalty` (k1/k2/k3 or the full-vocabulary ``K̃_t``). :func:`dense_rewards` runs the
pipeline: check every source for NaN/inf (:func:`finegrain.rewards.check_finite`), mix, normalise, clip, subtract
the KL penalty. Everything is exactly 0 outside ``response_mask`` (actions after EOS and padding). This module
imports only torch and finegrain's containers, errors and reward placement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from finegrain.errors import NonFiniteError
from finegrain.ops.masked import last_token_index, masked_sum, zero_masked
from finegrain.rewards.base import check_finite
from finegrain.rewards.placement import place_on_last_token
from finegrain.types import TokenRewards

__all__ = ["NORMALIZE_MODES", "RunningMoments", "dense_rewards", "lag_rewards", "reward_metrics"]

NORMALIZE_MODES = (None, "batch", "running")


def _check_kl(kl: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` if the KL term is NaN/inf on an action (padding is never looked at)."""
    bad = ~torch.isfinite(kl) & mask
    if bool(bad.any()):
        row, token = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteError(
            f"the KL term 'kl' is non-finite ({kl[row, token].item()}) at row {row}, token {token} "
            f"({int(bad.sum())} value(s)); clamp the log-ratio (kl_penalty(..., log_ratio_clip=...)) or check "
            "the policy and reference log-probs"
        )


def _place_sequence_scores(scores: torch.Tensor, mask: torch.Tensor, source: str) -> torch.Tensor:
    empty = last_token_index(mask) < 0
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"'{source}': rows {rows[:10]} have an empty response; a sequence score needs a token")
    return place_on_last_token(scores, mask)


class RunningMoments:
    """Running mean and variance of a stream of scalars (Chan et al.'s parallel update, in float64).

    Used by ``dense_rewards(normalize="running")`` on sequence returns. In multi-process training give
    :func:`dense_rewards` a ``gather`` function so that every rank folds in the same (global) returns and holds
    the same moments. ``state_dict`` / ``load_state_dict`` let a resumed run continue with the same statistics.
    """

    def __init__(self) -> None:
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        """Population variance of everything seen so far (0 before two values)."""
        return self.m2 / self.count if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, values: torch.Tensor) -> None:
        """Fold a 1-D tensor of values into the moments."""
        x = values.detach().to(torch.float64).flatten()
        n = float(x.numel())
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def dense_rewards(
    sources: TokenRewards | Mapping[str, TokenRewards],
    response_mask: torch.Tensor,
    *,
    scales: float | Mapping[str, float] = 1.0,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    clip: float | None = None,
    normalize: str | None = None,
    center: bool = True,
    running: RunningMoments | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """Per-action rewards ``R_t = clip(norm(Σ_s c_s·r^s_t)) − c_KL·KLterm_t`` in the response layout.

    ``r^s_t`` is source ``s``'s token value (0 outside its mask), plus its ``seq_reward`` on the last valid
    token of ``response_mask`` (EOS when the response has one; the last generated token of a truncated response;
    :func:`finegrain.rewards.place_on_last_token`). The settings of the papers (docs/methods/ppo.md): TLCR (Yoon
    et al. 2024, its official script): one source, ``clip=5``, ``kl`` = full-vocabulary ``K̃_t``, ``kl_coef=0.1``.
    Xu et al. (2024): one token-RM source, ``kl`` = k1, no terminal bonus (the exact form is our reading of the
    paper). SRM (Qiu et al. 2025, its released script): the sentence-RM source, ``kl`` = k1, ``kl_coef=0.01``.
    Sequence-RM baseline: a source with zero ``values`` and a ``seq_reward``.

    Normalisation acts on the **sequence return** ``G_i = Σ_t raw_{i,t}`` so that sparse rewards stay sparse:
    every token reward of row ``i`` is divided by ``std(G)`` and, with ``center=True``, ``mean(G)`` is
    subtracted on the row's last valid token, which makes the normalised returns ``(G_i − mean)/std`` exactly.
    For a sequence RM alone this is the usual score normalisation (OpenRLHF's ``normalize_reward``).
    ``normalize="batch"`` takes the moments over the rows of this batch; ``"running"`` folds this batch into
    ``running`` first and uses the running moments (OpenRLHF's order).

    Args:
        sources: one :class:`TokenRewards` (named ``"reward"``) or a mapping name → :class:`TokenRewards`, each with
            ``values`` ``(B, T)``, ``mask`` ``(B, T)`` and optional ``seq_reward`` ``(B,)``.
        response_mask: ``(B, T)`` bool, True on the actions of the response (EOS included, nothing after it).
        scales: ``c_s``, one float for every source or a mapping name → float (missing names get 1).
        kl: ``(B, T)`` KL term per action (:func:`finegrain.ops.kl.kl_penalty`); None for no penalty.
        kl_coef: ``c_KL``.
        clip: clip every task token reward (after normalisation) to ``[−clip, clip]``; None for no clipping.
        normalize: None, ``"batch"`` or ``"running"``.
        center: with normalisation, also subtract the mean return (on the last valid token).
        running: the :class:`RunningMoments` for ``normalize="running"`` (updated in place).
        gather: optional function ``(B,) -> (num_processes·B,)`` collecting the sequence returns of every process (e.g.
            ``accelerator.gather``), so that the normalisation statistics are global.
        eps: a variance at or below ``eps`` leaves the scale at 1 (only the mean is removed).

    Returns:
        A dict of ``(B, T)`` float tensors, all exactly 0 outside ``response_mask``:
        ``"raw"`` (mixed task reward before normalisation and clipping), ``"raw/<source>"`` (each source's
        scaled share of ``raw``), ``"score"`` (after normalisation and clipping), ``"kl"`` (the KL term, not
        multiplied by ``c_KL``), ``"penalized"`` (``score − c_KL·kl``, the reward for GAE / REINFORCE).

    Raises:
        NonFiniteError: a source's values or sequence score, or the KL term, holds NaN/inf.
        ValueError: shapes disagree, an unknown mode, or a sequence score for an empty response.

    Example:
        >>> m = torch.tensor([[True, True, False]])
        >>> src = TokenRewards(values=torch.tensor([[0.5, 0.0, 0.0]]), mask=m, seq_reward=torch.tensor([1.0]))
        >>> out = dense_rewards(src, m, kl=torch.tensor([[0.2, 0.1, 7.0]]), kl_coef=0.5)
        >>> out["penalized"]
        tensor([[0.4000, 0.9500, 0.0000]])
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalize={normalize!r}; choose None, 'batch' or 'running'")
    if normalize == "running" and running is None:
        raise ValueError("normalize='running' needs a RunningMoments passed as running=")
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be (B, T), got {tuple(response_mask.shape)}")
    if not sources:
        raise ValueError("dense_rewards needs at least one reward source")
    mask = response_mask.to(torch.bool)
    named = {"reward": sources} if isinstance(sources, TokenRewards) else dict(sources)

    out: dict[str, torch.Tensor] = {}
    raw = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for name, src in named.items():
        if src.values.shape != mask.shape:
            raise ValueError(f"source '{name}': values {tuple(src.values.shape)} != response_mask {tuple(mask.shape)}")
        # Checked where rewards enter: a NaN must name its source, not surface later as a NaN loss.
        check_finite(src, name)
        scale = scales.get(name, 1.0) if isinstance(scales, Mapping) else scales
        share = zero_masked(src.values.float(), src.mask.to(torch.bool) & mask)
        if src.seq_reward is not None:
            share = share + _place_sequence_scores(src.seq_reward.float(), mask, name)
        share = scale * share
        out[f"raw/{name}"] = share
        raw = raw + share
    out["raw"] = raw

    score = raw
    if normalize is not None:
        returns = masked_sum(raw, mask, dim=-1)
        pooled = gather(returns) if gather is not None else returns
        if normalize == "running":
            running.update(pooled)
            mean, var = running.mean, running.var
        else:
            mean, var = float(pooled.double().mean()), float(pooled.double().var(unbiased=False))
        # Equal returns (var 0, e.g. one row) carry no scale: dividing by sqrt(eps) would blow dense values up.
        std = math.sqrt(var) if var > eps else 1.0
        score = raw / std
        if center:
            score = score - _place_sequence_scores(torch.full_like(returns, mean / std), mask, "normalize")
    if clip is not None:
        score = score.clamp(-clip, clip)
    out["score"] = zero_masked(score, mask)

    if kl is None:
        out["kl"] = torch.zeros_like(raw)
    else:
        if kl.shape != mask.shape:
            raise ValueError(f"kl {tuple(kl.shape)} != response_mask {tuple(mask.shape)}")
        _check_kl(kl, mask)
        out["kl"] = zero_masked(kl.float(), mask)
    out["penalized"] = out["score"] - kl_coef * out["kl"]
    return out


def reward_metrics(rewards: Mapping[str, torch.Tensor], response_mask: torch.Tensor) -> dict[str, float]:
    """Batch means of the per-sequence sums of the reward components, under the shared metric names.

    Args:
        rewards: the dict returned by :func:`dense_rewards`.
        response_mask: ``(B, T)`` bool.

    Returns:
        ``{"rewards/raw", "rewards/kl", "rewards/penalized", "rewards/raw/<source>"...}`` → float, each the mean
        over rows of ``Σ_t`` of that component (``rewards/kl`` is the unscaled KL term).
    """
    metrics = {}
    for key, value in rewards.items():
        if key in ("raw", "kl", "penalized") or key.startswith("raw/"):
            metrics[f"rewards/{key}"] = float(masked_sum(value, response_mask, dim=-1).mean())
    return metrics


def lag_rewards(rewards: TokenRewards, lag: int) -> TokenRewards:
    """TLCR's one-position lag: ``values'[t] = values[t − lag]`` (0 for ``t < lag``), masked.

    The reward of token ``y_k`` is then credited to the action that produced ``y_{k+lag}``; values pushed past
    the end of a response are dropped, as in the official code, which shifts by one unlike the paper
    (docs/methods/tlcr.md). ``lag=0`` returns ``rewards`` unchanged.
    """
    if lag == 0:
        return rewards
    shifted = torch.zeros_like(rewards.values)
    shifted[:, lag:] = rewards.values[:, :-lag]
    return TokenRewards(values=zero_masked(shifted, rewards.mask), mask=rewards.mask,
                        seq_reward=rewards.seq_reward, meta=rewards.meta)
