"""What one preference batch gives ``finegrain po``: the per-token inputs of the loss (:class:`PreferenceStats`),
the per-pair metrics logged from them (:func:`pair_metrics`) and their reduction over pairs and processes
(:func:`accumulate`, :func:`reduce_metrics`).

Metrics are named as in docs/methods/dpo.md (``rewards/*``, ``logps/*``), docs/methods/tdpo.md (``kl/*``) and
docs/methods/treg.md (``treg/*``). Every value is summed per pair, the sums are added over micro-batches and
processes, and divided once at the end: the logged value is the same for any split of the global batch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from finegrain.losses import PreferenceLossOutput, get_preference_loss_spec
from finegrain.losses.treg import shared_token_rewards
from finegrain.ops import masked_sum

if TYPE_CHECKING:
    from finegrain.trainers.po_config import POConfig

__all__ = ["BASE_METRICS", "TREG_DIAGNOSTICS", "PreferenceStats", "accumulate", "halves", "metric_names",
           "pair_metrics", "reduce_metrics", "shared_token_masks"]


@dataclasses.dataclass
class PreferenceStats:
    """Per-token inputs of a preference loss for ``2B`` rows (chosen ``[0, B)``, rejected ``[B, 2B)``), ``(2B, T)``."""

    token_logps: torch.Tensor
    mask: torch.Tensor
    ref_token_logps: torch.Tensor | None = None
    token_kl: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None
    shared: torch.Tensor | None = None  # (2B, T) bool: tokens the pair's other response shares (T-REG diagnostic)


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen rows ``[0, B)`` and the rejected rows ``[B, 2B)`` of a ``(2B, ...)`` tensor."""
    b = x.shape[0] // 2
    return x[:b], x[b:]


BASE_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")
TREG_DIAGNOSTICS = ("treg/shared_reward", "treg/shared_abs_reward", "treg/diff_reward", "treg/diff_abs_reward",
                    "treg/shared_share")
"""T-REG's token-reward diagnostic (docs/methods/treg.md): the mean token reward ``r̂`` and mean ``|r̂|`` over the
response tokens that the pair's chosen and rejected responses share (:func:`shared_token_masks`) and over the tokens
where they differ, pooled over the logged pairs' tokens; and the share of tokens that are shared."""
_RATIOS = {  # metric -> (numerator, denominator), both summed per pair, divided after the sums over pairs
    "treg/shared_reward": ("sum/shared_reward", "sum/shared_tokens"),
    "treg/shared_abs_reward": ("sum/shared_abs_reward", "sum/shared_tokens"),
    "treg/diff_reward": ("sum/diff_reward", "sum/diff_tokens"),
    "treg/diff_abs_reward": ("sum/diff_abs_reward", "sum/diff_tokens"),
    "treg/shared_share": ("sum/shared_tokens", "sum/tokens"),
}


def metric_names(cfg: POConfig) -> tuple[str, ...]:
    """The metrics a run of ``cfg`` logs (see :func:`pair_metrics`)."""
    spec = get_preference_loss_spec(cfg.loss)
    extra = ("kl/chosen", "kl/rejected", "kl/margin") if spec.needs_ref_distribution else ()
    treg = ("treg/weight",) + TREG_DIAGNOSTICS if spec.needs_token_rewards else ()
    sft = ("nll_loss",) if cfg.loss == "dpo" and cfg.rpo_alpha is not None else ()
    return BASE_METRICS + extra + treg + sft


def shared_token_masks(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(2B, T)`` bool: the response tokens that a pair's chosen and rejected responses share.

    A token is shared when a minimal unit-cost Levenshtein alignment of the two token-id sequences (EOS included;
    :func:`finegrain.data.alignment.edit_tags`) keeps it unchanged; substituted, deleted and added tokens differ.
    Rows follow the batch layout (chosen ``[0, B)``, rejected ``[B, 2B)``); False where ``mask`` is False.

    Args:
        ids: ``(2B, T)`` response token ids.
        mask: ``(2B, T)`` bool response mask.

    Example:
        >>> shared_token_masks(torch.tensor([[5, 6, 2], [5, 7, 2]]), torch.ones(2, 3, dtype=torch.bool)).tolist()
        [[True, False, True], [True, False, True]]
    """
    from finegrain.data.alignment import edit_tags

    b = ids.shape[0] // 2
    rows = [ids[i][mask[i]].tolist() for i in range(2 * b)]
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for i in range(b):
        tags_w, tags_l = edit_tags(rows[i], rows[b + i])
        for row, tags in ((i, tags_w), (b + i, tags_l)):
            where = mask[row].nonzero().flatten()[: len(tags)]
            out[row, where.cpu()] = torch.tensor([t == "U" for t in tags], dtype=torch.bool)
    return out.to(mask.device)


def pair_metrics(out: PreferenceLossOutput, stats: PreferenceStats) -> dict[str, torch.Tensor]:
    """Per-pair metric values ``(B,)`` (detached); the logged value is their mean, except T-REG's diagnostic, whose
    per-pair sums (``sum/*``) become token means in :func:`reduce_metrics`.

    Named as in docs/methods/dpo.md (``rewards/*``), docs/methods/tdpo.md (``kl/*``) and docs/methods/treg.md
    (``treg/*``)."""
    chosen, rejected = halves(masked_sum(stats.token_logps.detach(), stats.mask, dim=-1))
    margins = out.chosen_rewards - out.rejected_rewards
    metrics = {"loss": out.losses.detach(), "rewards/chosen": out.chosen_rewards,
               "rewards/rejected": out.rejected_rewards, "rewards/margins": margins,
               "rewards/accuracies": (margins > 0).float(), "logps/chosen": chosen, "logps/rejected": rejected}
    logged = {"kl/chosen": "kl/chosen", "kl/rejected": "kl/rejected", "kl/margin": "kl/margin",
              "weights": "treg/weight", "nll_loss": "nll_loss"}  # the loss's extras: their metric names
    metrics.update({name: out.extras[key] for key, name in logged.items() if key in out.extras})
    if stats.token_rewards is not None and stats.shared is not None:
        (rw, rl), (mw, ml), (sw, sl) = halves(stats.token_rewards), halves(stats.mask), halves(stats.shared)
        metrics.update(shared_token_rewards(rw, rl, sw, sl, mw, ml))
    return {k: v.detach().float() for k, v in metrics.items()}


def accumulate(total: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    for k, v in metrics.items():
        total[k] = total.get(k, 0.0) + v.sum().double()


def reduce_metrics(total: dict[str, torch.Tensor], count: int, acc, names: tuple[str, ...]) -> dict[str, float]:
    """Means over ``count`` pairs of the summed per-pair values; ratio metrics (:data:`_RATIOS`) as the quotient of
    their summed numerator and denominator (0 when no token counts)."""
    # every process reduces the same keys, also one that had no pairs (a short evaluation split); the per-pair
    # values summed over pairs: ratio metrics become their numerators and denominators
    keys = sorted({key for name in names for key in _RATIOS.get(name, (name,))})
    values = torch.stack([torch.as_tensor(total.get(k, 0.0), dtype=torch.float64, device=acc.device) for k in keys])
    if acc.num_processes > 1:
        values = acc.reduce(values, reduction="sum")
    summed = dict(zip(keys, values))
    out = {}
    for name in names:
        if name in _RATIOS:
            num, den = (summed[k] for k in _RATIOS[name])
            out[name] = (num / den).item() if den > 0 else 0.0
        else:
            out[name] = (summed[name] / max(count, 1)).item()
    return out


