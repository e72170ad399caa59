"""Reward heads on top of a backbone's final hidden states.

* :class:`ScalarHead` -- ``v_i = w·h_i + b`` at every position: the token RM ``r_φ(x, y_≤t)`` (Xu et al.,
  ACL 2024; docs/methods/token-rm.md) on the reading states, or a sequence RM's score at the last token
  (without ``b`` by default: Bradley–Terry cannot determine it; docs/methods/reward-models.md).
* :class:`TwoClassHead` -- ``Linear(H, 2, bias=False)``: the TLCR token discriminator (Yoon et al. 2024;
  docs/methods/tlcr.md); class 1 = positive, class 0 = negative.
* :class:`SentenceRewardHead` -- the SRM aggregation (Qiu et al. 2025; docs/methods/reward-models.md):
  differential sentence rewards at the sentence boundaries, RoPE over the sentence index, attention from the last
  boundary.

Hidden states come from :func:`finegrain.models.forward.hidden_states` (``(B, P+T, H)`` in the padded layout);
token heads use :func:`~finegrain.models.forward.reading_states` (the state after reading each response token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.errors import ConfigError, DataError


class ScalarHead(nn.Module):
    """One scalar per position: ``v_i = w·h_i + b``.

    Args:
        hidden_size: ``H``.
        bias: learn ``b`` (True for token-RM and value heads; the sequence RM's default head has none).

    Shapes:
        ``hidden (..., H) -> (...)``.
    """

    def __init__(self, hidden_size: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, bias=bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1)


class TwoClassHead(nn.Module):
    """TLCR discriminator head: two logits per position, ``Linear(H, 2, bias=False)`` (class 1 = positive).

    Shapes:
        ``hidden (..., H) -> logits (..., 2)``; feed them to
        :func:`finegrain.losses.token_cls.tlcr_token_rewards` or the TLCR loss.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 2, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


def rope_rotate(x: torch.Tensor, index: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding over an integer index, rotating consecutive coordinate pairs.

    For ``i = 0 .. d/2-1`` and angle ``φ_i = index · θ^{-2i/d}``:
    ``out[2i] = x[2i] cos φ_i − x[2i+1] sin φ_i``, ``out[2i+1] = x[2i] sin φ_i + x[2i+1] cos φ_i``
    (the complex-multiplication form of the SRM code; docs/methods/reward-models.md).

    Args:
        x: ``(..., d)`` float, ``d`` even.
        index: ``(...)`` integer positions (here: the sentence index ``j``), broadcastable to ``x[..., 0]``.
        theta: the RoPE base.

    Returns:
        ``(..., d)`` in the dtype of ``x``.

    Example:
        >>> rope_rotate(torch.tensor([1.0, 0.0]), torch.tensor(1)).round(decimals=4)  # angle 1 rad
        tensor([0.5403, 0.8415])
    """
    d = x.shape[-1]
    if d % 2:
        raise ConfigError(f"RoPE needs an even embedding size, got {d}")
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=x.dtype) / d)  # (d/2,)
    angle = index.to(x.dtype).unsqueeze(-1) * inv_freq  # (..., d/2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    pairs = x.reshape(*x.shape[:-1], d // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).reshape(x.shape)


@dataclass
class SentenceRewardOutput:
    """What :class:`SentenceRewardHead` returns; ``K = N_max + 1`` boundary slots (``e_0 .. e_N``).

    Fields:
        score: ``(B,)`` response score ``R = Σ_j a_j s_j`` (or ``Σ_j v_{e_j}`` in the ablation).
        terms: ``(B, K)`` per-boundary terms ``a_j s_j``; they sum to ``score``; 0 on padding slots.
        term_mask: ``(B, K)`` bool, True on real boundary slots.
        attention: ``(B, K)`` attention weights ``a_j`` (sum to 1 per row; all ones on real slots in the
            ablation), 0 on padding.
        sentence_rewards: ``(B, K)`` differential rewards ``s_j`` (raw ``v_{e_j}`` in the ablation).
        boundary_positions: ``(B, K)`` long, the sequence position of each boundary, -1 on padding.
        num_boundaries: ``(B,)`` long, ``N + 1`` per row (1 for a fallback row).
        fell_back: ``(B,)`` bool, rows without any boundary that were scored at their fallback position.
    """

    score: torch.Tensor
    terms: torch.Tensor
    term_mask: torch.Tensor
    attention: torch.Tensor
    sentence_rewards: torch.Tensor
    boundary_positions: torch.Tensor
    num_boundaries: torch.Tensor
    fell_back: torch.Tensor


class SentenceRewardHead(nn.Module):
    """SRM aggregation over sentence boundaries (Qiu et al. 2025, arXiv 2503.04793; docs/methods/reward-models.md).

    At the boundaries ``e_0 .. e_N`` (``e_0`` after the prompt, ``e_j`` at the end of sentence ``j``):

    * ``v_i = w_r·h_i + b_r``, ``q_i = W_q h_i + b_q``, ``k_i = W_k h_i + b_k`` (``q, k ∈ R^d``);
    * differential sentence rewards ``s_0 = v_{e_0}``, ``s_j = v_{e_j} − v_{e_{j−1}}``;
    * RoPE over the sentence index: ``q̃_j, k̃_j`` = :func:`rope_rotate` of ``q_{e_j}, k_{e_j}`` by ``j``;
    * one query, the last boundary: ``a_j = softmax_j(q̃_N · k̃_j / √d)``, in float32 at least;
    * score ``R = Σ_j a_j s_j``.

    Ablation ``weighted_sum=False``: ``R = Σ_j v_{e_j}`` (no differences, no attention); the SRM code then
    scales the Bradley–Terry logit by ``1 / max(N_w, N_l)`` with ``N`` = :attr:`SentenceRewardOutput.num_boundaries`
    (pass it as ``logit_scale`` to :func:`finegrain.losses.bt.bradley_terry_loss`).

    A row without any boundary falls back to ``R = v`` at its ``fallback_positions`` entry (e.g. its last real
    token), which is exactly the one-boundary case of the formula (``a_0 = 1``, ``s_0 = v``).

    The forward pass is vectorised: boundary rows are gathered into a padded ``(B, K, H)`` tensor, and the heads
    run only on those rows.

    Args:
        hidden_size: ``H``.
        embed_dim: ``d`` of queries and keys (128 in the SRM code's default, 256 in its released script).
        rope_theta: RoPE base ``θ``.
        max_sentences: the most boundaries a row may have, ``e_0`` included (``max_rope_sentences`` of the SRM
            code, 100 in training, 200 in RL); more raises a :class:`DataError` (RoPE, so ``weighted_sum`` only).
        weighted_sum: the attention aggregation (True) or the plain-sum ablation (False).
    """

    def __init__(self, hidden_size: int, embed_dim: int = 128, *, rope_theta: float = 10000.0,
                 max_sentences: int = 100, weighted_sum: bool = True):
        super().__init__()
        if embed_dim % 2:
            raise ConfigError(f"SentenceRewardHead: embed_dim must be even for RoPE, got {embed_dim}")
        if max_sentences < 1:
            raise ConfigError(f"SentenceRewardHead: max_sentences must be >= 1, got {max_sentences}")
        self.embed_dim, self.rope_theta, self.max_sentences = embed_dim, rope_theta, max_sentences
        self.weighted_sum = weighted_sum
        self.value = nn.Linear(hidden_size, 1)
        if weighted_sum:
            self.query = nn.Linear(hidden_size, embed_dim)
            self.key = nn.Linear(hidden_size, embed_dim)

    def forward(self, hidden: torch.Tensor, boundary_mask: torch.Tensor | None = None, *,
                boundary_positions: torch.Tensor | None = None,
                fallback_positions: torch.Tensor | None = None) -> SentenceRewardOutput:
        """Score every row from its boundary hidden states.

        Args:
            hidden: ``(B, L, H)`` final hidden states.
            boundary_mask: ``(B, L)`` bool, True at the boundaries ``e_0 .. e_N`` (e.g. from
                :func:`srm_boundary_mask`). Give this or ``boundary_positions``.
            boundary_positions: ``(B, K)`` long, increasing positions per row, -1 padding at the end.
            fallback_positions: ``(B,)`` long, where to read ``v`` for a row without boundaries
                (required only if such a row exists).

        Returns:
            :class:`SentenceRewardOutput`.

        Raises:
            DataError: a row has more than ``max_sentences`` boundaries, no boundary and no fallback position,
                or malformed boundary positions.
        """
        B, L, H = hidden.shape
        positions = self._positions(boundary_mask, boundary_positions, B, L)
        counts = (positions >= 0).sum(dim=1)
        fell_back = counts == 0
        if bool(fell_back.any()):
            if fallback_positions is None:
                row = int(torch.nonzero(fell_back)[0, 0])
                raise DataError(f"row {row} has no sentence boundary and no fallback position was given")
            positions = positions.clone()
            positions[:, 0] = torch.where(fell_back, fallback_positions.to(positions), positions[:, 0])
            counts = torch.where(fell_back, torch.ones_like(counts), counts)
        if self.weighted_sum and int(counts.max()) > self.max_sentences:
            row = int(torch.argmax(counts))
            raise DataError(
                f"row {row} has {int(counts[row])} sentence boundaries, more than max_sentences="
                f"{self.max_sentences}; raise max_sentences or truncate the response"
            )
        K = positions.shape[1]
        valid = torch.arange(K, device=hidden.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, K)
        index = positions.clamp(min=0)
        rows = hidden.gather(1, index.unsqueeze(-1).expand(B, K, H))  # (B, K, H)
        v = self.value(rows).squeeze(-1)  # (B, K)
        work = torch.promote_types(v.dtype, torch.float32)  # attention in fp32 at least (the SRM code upcasts fp16)
        zero = torch.zeros((), dtype=work, device=hidden.device)

        if not self.weighted_sum:
            sentence_rewards = torch.where(valid, v.to(work), zero)
            attention = valid.to(work)
        else:
            # s_0 = v_{e_0}, s_j = v_{e_j} - v_{e_{j-1}}
            previous = torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)
            sentence_rewards = torch.where(valid, (v - previous).to(work), zero)
            last = (counts - 1).unsqueeze(1)  # (B, 1) sentence index of the query
            last_row = rows.gather(1, last.unsqueeze(-1).expand(B, 1, H))  # (B, 1, H)
            j = torch.arange(K, device=hidden.device).expand(B, K)
            q = rope_rotate(self.query(last_row).to(work), last, self.rope_theta)  # (B, 1, d)
            k = rope_rotate(self.key(rows).to(work), j, self.rope_theta)  # (B, K, d)
            logits = (q * k).sum(-1) / math.sqrt(self.embed_dim)  # (B, K)
            logits = logits.masked_fill(~valid, float("-inf"))
            attention = torch.softmax(logits, dim=1)
        terms = attention * sentence_rewards
        return SentenceRewardOutput(score=terms.sum(dim=1), terms=terms, term_mask=valid, attention=attention,
                                    sentence_rewards=sentence_rewards,
                                    boundary_positions=torch.where(valid, positions, -1),
                                    num_boundaries=counts, fell_back=fell_back)

    @staticmethod
    def _positions(
        boundary_mask: torch.Tensor | None, boundary_positions: torch.Tensor | None, B: int, L: int
    ) -> torch.Tensor:
        """Boundary positions ``(B, K)``, increasing, -1 padded, ``K >= 1``."""
        if (boundary_mask is None) == (boundary_positions is None):
            raise ConfigError("SentenceRewardHead: give exactly one of boundary_mask and boundary_positions")
        if boundary_mask is not None:
            if boundary_mask.shape != (B, L):
                raise DataError(f"boundary_mask {tuple(boundary_mask.shape)} must be (B, L) = {(B, L)}")
            mask = boundary_mask.to(torch.bool)
            K = max(int(mask.sum(dim=1).max()) if B else 0, 1)
            # Non-boundaries sort after every real position, so the first K columns are the boundaries in
            # order (padded to K columns when L == 0).
            pos = torch.where(mask, torch.arange(L, device=mask.device), L).sort(dim=1).values
            pos = F.pad(pos, (0, max(K - L, 0)), value=L)[:, :K]
            return torch.where(pos < L, pos, -1)
        pos = boundary_positions.long()
        if pos.dim() != 2 or pos.shape[0] != B:
            raise DataError(f"boundary_positions {tuple(pos.shape)} must be (B, K) with B = {B}")
        if pos.shape[1] == 0:
            pos = torch.full((B, 1), -1, dtype=torch.long, device=pos.device)
        valid = pos >= 0
        bad_range = (pos < -1) | (pos >= L)
        # valid slots first, each larger than the one before
        bad_order = (valid[:, 1:] & ~valid[:, :-1]) | (valid[:, 1:] & (pos[:, 1:] <= pos[:, :-1]))
        if bool(bad_range.any()) or bool(bad_order.any()):
            raise DataError(
                "boundary_positions must be increasing positions in [0, L) per row, padded with -1 at the end"
            )
        return pos


def srm_boundary_mask(
    response_boundaries: Sequence[Sequence[int]], prompt_width: int, response_width: int, device: str | None = None
) -> torch.Tensor:
    """SRM boundary mask in the padded batch layout: ``e_0`` at column ``P − 1``, ``e_j`` at ``P + index``.

    The prompt block is left-padded, so the last prompt token (``e_0``, the prompt's ``<END>`` in mode (a)) is
    always column ``P − 1``; response boundaries index the right-padded response block.

    Args:
        response_boundaries: per row, the response indices of ``e_1 .. e_N``
            (:attr:`finegrain.data.segmentation.SentenceBoundaries.response_boundaries`).
        prompt_width: ``P`` (at least 1).
        response_width: ``T``.
        device: where to build the mask.

    Returns:
        ``(B, P + T)`` bool.

    Example:
        >>> srm_boundary_mask([[0, 2], []], 2, 3).int()
        tensor([[0, 1, 1, 0, 1],
                [0, 1, 0, 0, 0]], dtype=torch.int32)
    """
    if prompt_width < 1:
        raise DataError("SRM needs a prompt block of at least one column for the boundary e_0")
    mask = torch.zeros(len(response_boundaries), prompt_width + response_width, dtype=torch.bool, device=device)
    mask[:, prompt_width - 1] = True
    for row, ends in enumerate(response_boundaries):
        if any(e < 0 or e >= response_width for e in ends):
            raise DataError(f"response boundaries {list(ends)} outside the response block of {response_width}", row=row)
        mask[row, [prompt_width + e for e in ends]] = True
    return mask
