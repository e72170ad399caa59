"""Typed containers that cross module boundaries, with the shape of every field.

Batch layout (shared by every trainer, offline and online):

* the prompt block is **left-padded** to ``P`` columns, the response block **right-padded** to ``T`` columns;
  the model input is ``cat([prompt_input_ids, completion_input_ids], dim=1)`` with position ids computed from
  the attention mask, so padding never changes a logit;
* per-token tensors (log-probs, rewards, KLs, masks) are in the **response layout** ``(N, T)``: index ``t`` is
  aligned with ``completion_input_ids[:, t]``, i.e. with the action that produced response token ``y_t``;
* in preference batches rows ``[0, B)`` are the chosen responses and rows ``[B, 2B)`` the rejected ones, so
  ``N = 2B``.

See ``finegrain.data.collate`` for a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class CompletionBatch:
    """Prompt + response rows (SFT, token supervision, reward scoring, rollouts).

    Fields:
        prompt_input_ids: ``(N, P)`` long, left-padded with the pad id.
        prompt_attention_mask: ``(N, P)`` long, 1 on real prompt tokens.
        completion_input_ids: ``(N, T)`` long, right-padded; EOS is the last real token when present.
        completion_mask: ``(N, T)`` bool, True on real response tokens (EOS included).
        extras: per-token or per-row tensors carried along, e.g. ``token_rewards (N, T)``,
            ``token_labels (N, T)``, ``ref_token_logps (N, T)``.
        prompts: the ``N`` prompts as the data set gave them (a string or a list of chat messages), or None.
            Reward sources that read text (rule rewards, contrastive templates) use them; without them they decode
            the prompt block, which is exact only for plain-text prompts.
        responses: the ``N`` response texts, or None (sources then decode the response block). Set once by whoever
            built the batch, so several text-reading sources do not decode it again.
    """

    prompt_input_ids: torch.Tensor
    prompt_attention_mask: torch.Tensor
    completion_input_ids: torch.Tensor
    completion_mask: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    prompts: list[Any] | None = None
    responses: list[str] | None = None

    @property
    def num_rows(self) -> int:
        return self.completion_input_ids.shape[0]

    def to(self, device: torch.device | str):
        """Return a copy with every tensor field moved to ``device``."""
        return type(self)(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})


@dataclass
class PreferenceBatch(CompletionBatch):
    """A :class:`CompletionBatch` of ``2B`` rows: chosen rows ``[0, B)``, then rejected rows ``[B, 2B)``."""

    @property
    def num_pairs(self) -> int:
        return self.completion_input_ids.shape[0] // 2


@dataclass
class TokenRewards:
    """The reward contract: what every reward source returns.

    Fields:
        values: ``(B, T)`` float32, aligned with the response tokens of the policy's tokenization, exactly 0
            where ``mask`` is False.
        mask: ``(B, T)`` bool, True on response tokens that carry a reward slot.
        seq_reward: ``(B,)`` float32 or None, an optional sequence score (e.g. a sequence RM's output).
        meta: anything else a source wants to report (sentence boundaries, raw probabilities, ...).
    """

    values: torch.Tensor
    mask: torch.Tensor
    seq_reward: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.shape != self.mask.shape:
            raise ValueError(f"TokenRewards: values {tuple(self.values.shape)} and mask {tuple(self.mask.shape)} differ")
        if self.seq_reward is not None and self.seq_reward.shape != self.values.shape[:1]:
            raise ValueError(
                f"TokenRewards: seq_reward {tuple(self.seq_reward.shape)} does not match batch {self.values.shape[0]}"
            )
