"""Token-level supervision from minimal edits: the TLCR discriminator and the minimal-edit token reward model.

Labels come from :mod:`finegrain.data.alignment`: on the rejected response ``y_l`` a token is -1 (substituted or
deleted by the revision) or 0; on the revision ``y_e`` (TLCR's ``y_m``) a token is +1 (substituted or added) or 0.
``A`` = revision tokens labelled +1, ``D`` = rejected tokens labelled -1.

* TLCR (Yoon et al., Findings ACL 2024, arXiv 2407.16574; docs/methods/tlcr.md): the discriminator loss
  :func:`tlcr_loss` and the token rewards :func:`tlcr_token_rewards`.
* Minimal-edit token RM (Xu et al., ACL 2024, arXiv 2406.02756; docs/methods/token-rm.md): :func:`minimal_edit_loss`,
  objectives A (``edit_bt``) and B (``token_cls``). Both are our choice, not the paper's (its training objective is
  not available to us).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from finegrain.errors import ConfigError, DataError
from finegrain.losses.bt import bradley_terry_loss
from finegrain.ops.masked import masked_mean, masked_sum


def _check(values: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, name: str, classes: int = 0) -> None:
    """Shapes agree and labels are in {-1, 0, 1} on the mask."""
    want = values.shape[:-1] if classes else values.shape
    if classes and (values.dim() != 3 or values.shape[-1] != classes):
        raise DataError(f"{name} logits {tuple(values.shape)} must be (B, T, {classes}): {classes} classes per token")
    if labels.shape != want or mask.shape != want or len(want) != 2:
        raise DataError(
            f"{name}: outputs {tuple(values.shape)}, labels {tuple(labels.shape)} and mask {tuple(mask.shape)} "
            "must agree on (B, T)"
        )
    on = labels[mask.to(torch.bool)]
    if on.numel() and not bool(((on == -1) | (on == 0) | (on == 1)).all()):
        raise DataError(f"{name} labels must be -1, 0 or +1 on response tokens, got {sorted(set(on.tolist()))}")


def tlcr_soft_targets(labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """TLCR soft targets over (negative, positive): ``+1 -> (0, 1)``, ``-1 -> (1, 0)``, ``0 -> (½, ½)``.

    Args:
        labels: ``(B, T)`` ints in ``{-1, 0, +1}``.
        dtype: of the result.

    Returns:
        ``(B, T, 2)``; equals ``((1 − y)/2, (1 + y)/2)`` for ``y`` the label.

    Example:
        >>> tlcr_soft_targets(torch.tensor([[1, -1, 0]]))
        tensor([[[0.0000, 1.0000],
                 [1.0000, 0.0000],
                 [0.5000, 0.5000]]])
    """
    y = labels.to(dtype)
    return torch.stack([(1 - y) / 2, (1 + y) / 2], dim=-1)


def tlcr_sequence_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, hard: bool = False
) -> torch.Tensor:
    """Per-sequence TLCR token loss, averaged over the sequence's response tokens.

    Soft (default): ``(1/|m|) Σ_t m_t · (−Σ_c q_{t,c} log softmax(z_t)_c)`` with ``q`` = :func:`tlcr_soft_targets`.
    Hard (the official code's variant): ``(1/|m'|) Σ_t m'_t · (−log softmax(z_t)_{c_t})`` over non-neutral tokens
    ``m' = m ∧ (y ≠ 0)``, ``c_t = 1`` for +1 and 0 for -1; a sequence without non-neutral tokens contributes 0.

    Args:
        logits: ``(B, T, 2)`` discriminator logits (class 1 = positive).
        labels: ``(B, T)`` in ``{-1, 0, +1}``.
        mask: ``(B, T)`` bool response mask.
        hard: use the hard-label variant.

    Returns:
        ``(B,)`` loss per sequence.
    """
    _check(logits, labels, mask, "tlcr", classes=2)
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    if hard:
        token_loss = -logp.gather(-1, (labels > 0).long().unsqueeze(-1)).squeeze(-1)
        return masked_mean(token_loss, mask.to(torch.bool) & (labels != 0), dim=-1)
    token_loss = -(tlcr_soft_targets(labels, logp.dtype) * logp).sum(-1)
    return masked_mean(token_loss, mask, dim=-1)


class TLCRLossOutput(NamedTuple):
    """Fields: ``loss`` scalar ``L_pos + L_neg``; ``positive_losses (B,)`` on revisions; ``negative_losses (B,)``."""

    loss: torch.Tensor
    positive_losses: torch.Tensor
    negative_losses: torch.Tensor


def tlcr_loss(
    revised_logits: torch.Tensor,
    revised_labels: torch.Tensor,
    revised_mask: torch.Tensor,
    rejected_logits: torch.Tensor,
    rejected_labels: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    hard: bool = False,
) -> TLCRLossOutput:
    """TLCR discriminator loss ``L = mean_b L_pos(b) + mean_b L_neg(b)`` (docs/methods/tlcr.md).

    Args:
        revised_logits: ``(B, T_e, 2)`` head logits on the revisions' response tokens.
        revised_labels: ``(B, T_e)`` in ``{0, +1}`` (other values are allowed and use their soft targets).
        revised_mask: ``(B, T_e)`` bool.
        rejected_logits: ``(B, T_l, 2)`` head logits on the rejected responses' tokens.
        rejected_labels: ``(B, T_l)`` in ``{-1, 0}``.
        rejected_mask: ``(B, T_l)`` bool.
        hard: the hard-label variant (neutral tokens ignored).

    Returns:
        :class:`TLCRLossOutput`.
    """
    pos = tlcr_sequence_loss(revised_logits, revised_labels, revised_mask, hard=hard)
    neg = tlcr_sequence_loss(rejected_logits, rejected_labels, rejected_mask, hard=hard)
    return TLCRLossOutput(pos.mean() + neg.mean(), pos, neg)


TLCR_REWARD_MODES: tuple[str, ...] = ("continuous", "sign", "fixed", "thresholded", "random", "positive", "negative")
"""Token rewards of :func:`tlcr_token_rewards`: TLCR's continuous reward and the baselines of Yoon et al. (2024),
defined as the official code's reward modes define them (docs/methods/tlcr.md, "Reward modes")."""

OFFICIAL_NEUTRAL_BAND = math.log(1.5)
"""The official code's neutral band: a token is neutral when ``0.4 < max softmax(p) < 0.6`` with ``p`` the
discriminator's probabilities, i.e. when ``|p_+ − p_−| = |2·P(+) − 1| < ln 1.5 ≈ 0.405``."""


def tlcr_token_rewards(
    head_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    double_softmax_compat: bool = False,
    lag: int = 0,
    mode: str = "continuous",
    end_mask: torch.Tensor | None = None,
    neutral_band: float = OFFICIAL_NEUTRAL_BAND,
    positive_value: float = 1.0,
    negative_value: float = -1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TLCR's token reward ``r_t = 2·P(+ | x, y_≤t) − 1 = tanh((z_1 − z_0)/2) ∈ (−1, 1)`` and its discrete baselines.

    Yoon et al., Findings ACL 2024, arXiv 2407.16574 (docs/methods/tlcr.md). With ``δ_t = 2·P(+) − 1`` (one
    softmax over the logits ``z``) and ``c_t`` the continuous reward (``δ_t``, or ``tanh(δ_t / 2)`` with
    ``double_softmax_compat``), ``b`` = ``neutral_band``, ``v₊`` / ``v₋`` = ``positive_value`` / ``negative_value``:

    ===============  ========================================================  =======================================
    ``mode``          ``r_t``                                                   official code (``forward_value``)
    ===============  ========================================================  =======================================
    ``continuous``    ``c_t``                                                   ``--sum_to_one_reward`` (TLCR)
    ``sign``          ``v₊`` if ``δ_t ≥ b``, ``v₋`` if ``δ_t ≤ −b``, else 0     ``--fixed_reward`` (±1/0)
    ``fixed``         ``v₊`` if ``c_t > 0``, ``v₋`` if ``c_t < 0``, else 0      ``--fixed_reward --sum_to_one_reward``
    ``thresholded``   ``sign(δ_t)·σ(|δ_t|)`` if ``|δ_t| ≥ b``, else 0           no flag (its default)
    ``random``        ``s_t·u_t``: ``s_t`` = −1, 0, +1 with probability         ``--random_dense_reward``
                      0.4, 0.2, 0.4; ``u_t ~ U(0.55, 1)``; the discriminator
                      is not read
    ``positive``      ``max(c_t, 0)``                                           ``--sum_to_one_reward
                                                                                --use_positive_reward_only``
    ``negative``      ``min(c_t, 0)``                                           ``... --use_negative_reward_only``
    ===============  ========================================================  =======================================

    The official code decides signs on the second softmax ``q = softmax(p)``: neutral when ``0.4 < max q < 0.6``.
    Since ``max q = σ(|p_1 − p_0|) = σ(|δ_t|)``, that is ``|δ_t| < ln 1.5`` (:data:`OFFICIAL_NEUTRAL_BAND`, the
    default ``b``), and ``thresholded``'s magnitude ``max q`` is ``σ(|δ_t|) ∈ [0.6, 0.731]``.

    Then positions outside ``mask`` and on ``end_mask`` get 0 (the official code writes rewards only before the
    first EOS), and ``lag`` shifts: ``lag=1`` reproduces the official code's index shift, the score of token
    ``y_{t−1}`` credited to action ``t`` (the first action gets 0; with ``end_mask`` on EOS, the EOS action gets the
    last content token's score, as in that code). ``double_softmax_compat=True`` reproduces its second softmax in
    the continuous value, ``2·softmax(p_t)_1 − 1 = tanh((p_1 − p_0)/2) ∈ [−0.462, 0.462]``. Use both only for
    parity with that code.

    Args:
        head_logits: ``(B, T, 2)`` discriminator logits on the response tokens (class 1 = positive).
        mask: ``(B, T)`` bool response mask.
        double_softmax_compat: apply the official code's second softmax to the continuous value.
        lag: shift rewards ``lag`` positions to the right (0 = the paper's alignment).
        mode: one of :data:`TLCR_REWARD_MODES`.
        end_mask: ``(B, T)`` bool, positions whose reward is 0 before the shift (the end-of-response token), or
            None.
        neutral_band: ``b`` in ``[0, 1]`` (``sign`` and ``thresholded``).
        positive_value, negative_value: ``v₊``, ``v₋`` (``sign`` and ``fixed``; the official defaults ±1).
        generator: the random stream of ``mode="random"`` (None: torch's global one); draws are made on the CPU.

    Returns:
        ``(B, T)`` rewards in float32 (or float64 for float64 logits), 0 where ``mask`` is False.

    Example:
        >>> tlcr_token_rewards(torch.tensor([[[0.0, 0.0], [0.0, 100.0]]]), torch.ones(1, 2, dtype=torch.bool))
        tensor([[0., 1.]])
        >>> z = torch.tensor([[[0.0, 0.2], [0.0, 2.0], [0.0, -3.0]]])  # δ = tanh(z₁/2): 0.10, 0.76, −0.91
        >>> tlcr_token_rewards(z, torch.ones(1, 3, dtype=torch.bool), mode="sign")
        tensor([[ 0.,  1., -1.]])
    """
    if head_logits.dim() != 3 or head_logits.shape[-1] != 2 or head_logits.shape[:2] != mask.shape:
        raise DataError(f"head_logits {tuple(head_logits.shape)} must be (B, T, 2) for a mask of {tuple(mask.shape)}")
    if lag < 0:
        raise ConfigError(f"tlcr_token_rewards: lag must be >= 0, got {lag}")
    if mode not in TLCR_REWARD_MODES:
        raise ConfigError(f"tlcr_token_rewards: mode must be one of {', '.join(TLCR_REWARD_MODES)}, got {mode!r}")
    if not 0.0 <= neutral_band <= 1.0:
        raise ConfigError(f"tlcr_token_rewards: neutral_band must be in [0, 1] (a bound on |2·P(+) − 1|), "
                          f"got {neutral_band}")
    if end_mask is not None and end_mask.shape != mask.shape:
        raise DataError(f"end_mask {tuple(end_mask.shape)} must be {tuple(mask.shape)}")
    z = head_logits.to(torch.promote_types(head_logits.dtype, torch.float32))
    # 2σ(z1 − z0) − 1 = tanh((z1 − z0)/2): no cancellation near ±1.
    delta = torch.tanh((z[..., 1] - z[..., 0]) / 2)
    cont = torch.tanh(delta / 2) if double_softmax_compat else delta  # softmax(p)_1 − softmax(p)_0 = tanh(δ/2)
    zero = torch.zeros_like(delta)
    if mode == "continuous":
        rewards = cont
    elif mode == "sign":
        rewards = torch.where(delta >= neutral_band, positive_value, torch.where(delta <= -neutral_band,
                                                                                negative_value, zero))
    elif mode == "fixed":
        rewards = torch.where(cont > 0, positive_value, torch.where(cont < 0, negative_value, zero))
    elif mode == "thresholded":
        rewards = torch.where(delta.abs() >= neutral_band, torch.sign(delta) * torch.sigmoid(delta.abs()), zero)
    elif mode == "random":
        u = torch.rand(delta.shape, generator=generator, dtype=torch.float64)
        m = torch.rand(delta.shape, generator=generator, dtype=torch.float64)
        sign = torch.where(u <= 0.4, -1.0, torch.where(u >= 0.6, 1.0, 0.0))
        rewards = (sign * (0.45 * m + 0.55)).to(delta.dtype).to(delta.device)
    elif mode == "positive":
        rewards = cont.clamp(min=0.0)
    else:  # negative
        rewards = cont.clamp(max=0.0)
    mask = mask.to(torch.bool)
    keep = mask if end_mask is None else mask & ~end_mask.to(torch.bool)
    rewards = torch.where(keep, rewards.to(delta.dtype), zero)
    if lag:
        rewards = F.pad(rewards, (lag, 0))[:, : rewards.shape[1]]
        rewards = torch.where(mask, rewards, zero)
    return rewards


def expected_label_rewards(logits: torch.Tensor) -> torch.Tensor:
    """Reward of a 3-way token classifier over labels (−1, 0, +1): the expected label ``P(+1) − P(−1)``.

    Args:
        logits: ``(..., 3)``, class order (−1, 0, +1).

    Returns:
        ``(...)`` in ``[−1, 1]``.

    Example:
        >>> expected_label_rewards(torch.tensor([0.0, 0.0, 0.0]))
        tensor(0.)
    """
    p = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return p[..., 2] - p[..., 0]


class MinimalEditOutput(NamedTuple):
    """Per-pair results of :func:`minimal_edit_loss`; batch loss = ``losses.mean()``.

    Fields:
        losses: ``(B,)`` total per pair.
        token_losses: ``(B,)`` the edit-focused BT term before ``edit_weight`` (A) or the token classification
            term (B).
        sequence_losses: ``(B,)`` the sequence BT term before ``seq_weight`` (zeros for B).
        accuracies: ``(B,)`` 1 where the edit margin ``Σ_A r − Σ_D r`` is positive (A; for B the margin of the
            expected-label rewards), detached.
    """

    losses: torch.Tensor
    token_losses: torch.Tensor
    sequence_losses: torch.Tensor
    accuracies: torch.Tensor


def minimal_edit_loss(
    revised_outputs: torch.Tensor,
    revised_labels: torch.Tensor,
    revised_mask: torch.Tensor,
    rejected_outputs: torch.Tensor,
    rejected_labels: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    objective: Literal["edit_bt", "token_cls"] = "edit_bt",
    chosen_scores: torch.Tensor | None = None,
    seq_weight: float = 1.0,
    cls_loss: Literal["mse", "ce"] = "mse",
    edit_weight: float = 1.0,
) -> MinimalEditOutput:
    """Training objective of the minimal-edit token reward model (Xu et al., ACL 2024; docs/methods/token-rm.md).

    A, ``objective="edit_bt"`` (default)::

        L = edit_weight · (−log σ(Σ_{t∈A} r_e,t − Σ_{t∈D} r_l,t)) + seq_weight · (−log σ(S(y_w) − S(y_l)))

    with ``r`` the per-token rewards ``r_φ(x, y_≤t)``, ``S(y_l) = Σ_t m_t r_l,t`` and ``S(y_w)`` = ``chosen_scores``
    (the original chosen responses' ``Σ_t m_t r``) or, when None, ``S(y_e)`` of the revisions. A pair without
    edits (A = D = ∅) has edit term ``log 2`` and no gradient from it. ``edit_weight=0, seq_weight=1`` is plain
    Bradley–Terry on the summed token rewards ``S`` (the usual way to train a dense RM from pairs); a positive
    weight is needed on at least one term.

    B, ``objective="token_cls"``: targets +1 on A, −1 on D and 0 on unchanged tokens, per sequence averaged over
    its response tokens, revision + rejected:

    * ``cls_loss="mse"``: outputs are scalar rewards, ``(r_t − y_t)²``;
    * ``cls_loss="ce"``: outputs are 3-way logits (order −1, 0, +1), ``−log softmax(z_t)_{y_t+1}``; the reward is
      :func:`expected_label_rewards`.

    Args:
        revised_outputs: ``(B, T_e)`` token rewards (A, B-mse) or ``(B, T_e, 3)`` logits (B-ce) on the revisions.
        revised_labels: ``(B, T_e)`` in ``{0, +1}``.
        revised_mask: ``(B, T_e)`` bool.
        rejected_outputs: ``(B, T_l)`` or ``(B, T_l, 3)`` on the rejected responses.
        rejected_labels: ``(B, T_l)`` in ``{-1, 0}``.
        rejected_mask: ``(B, T_l)`` bool.
        objective: ``"edit_bt"`` (A) or ``"token_cls"`` (B).
        chosen_scores: ``(B,)`` ``S(y_w)`` of the original chosen responses, or None to use the revisions (A only).
        seq_weight: weight of the sequence BT term (A only); 0 disables it.
        cls_loss: ``"mse"`` or ``"ce"`` (B only).
        edit_weight: weight of the edit term (A only); 0 disables it.

    Returns:
        :class:`MinimalEditOutput`.
    """
    classes = 3 if objective == "token_cls" and cls_loss == "ce" else 0
    _check(revised_outputs, revised_labels, revised_mask, "revised", classes)
    _check(rejected_outputs, rejected_labels, rejected_mask, "rejected", classes)
    rev_mask, rej_mask = revised_mask.to(torch.bool), rejected_mask.to(torch.bool)
    added, deleted = rev_mask & (revised_labels > 0), rej_mask & (rejected_labels < 0)  # A and D

    if objective == "edit_bt":
        if edit_weight < 0 or seq_weight < 0 or not (edit_weight > 0 or seq_weight > 0):
            raise ConfigError(f"minimal_edit_loss: edit_weight ({edit_weight}) and seq_weight ({seq_weight}) must be "
                              ">= 0 and one of them > 0")
        edit = bradley_terry_loss(masked_sum(revised_outputs, added, dim=-1),
                                  masked_sum(rejected_outputs, deleted, dim=-1))
        seq_losses = torch.zeros_like(edit.losses)
        if seq_weight:
            s_w = masked_sum(revised_outputs, rev_mask, dim=-1) if chosen_scores is None else chosen_scores
            seq_losses = bradley_terry_loss(s_w, masked_sum(rejected_outputs, rej_mask, dim=-1)).losses
        total = seq_weight * seq_losses
        if edit_weight:  # off: the edit term is reported (detached) but not differentiated
            total = total + edit_weight * edit.losses
        return MinimalEditOutput(total, edit.losses if edit_weight else edit.losses.detach(), seq_losses,
                                 edit.accuracies)

    if objective != "token_cls":
        raise ConfigError(f"minimal_edit_loss: objective must be 'edit_bt' or 'token_cls', got {objective!r}")
    if cls_loss not in ("mse", "ce"):
        raise ConfigError(f"minimal_edit_loss: cls_loss must be 'mse' or 'ce', got {cls_loss!r}")
    rev_tok, rev_r = _token_cls_terms(revised_outputs, revised_labels, cls_loss)
    rej_tok, rej_r = _token_cls_terms(rejected_outputs, rejected_labels, cls_loss)
    token_losses = masked_mean(rev_tok, rev_mask, dim=-1) + masked_mean(rej_tok, rej_mask, dim=-1)
    margin = masked_sum(rev_r, added, dim=-1) - masked_sum(rej_r, deleted, dim=-1)
    accuracies = (margin.detach() > 0).to(token_losses.dtype)
    return MinimalEditOutput(token_losses, token_losses, torch.zeros_like(token_losses), accuracies)


def _token_cls_terms(outputs: torch.Tensor, labels: torch.Tensor, cls_loss: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective B on one side: ``(token losses, token rewards)``, each ``(B, T)``.

    ``"mse"``: ``(r_t − y_t)²`` on the scalar rewards ``r``; ``"ce"``: ``−log softmax(z)_{y+1}`` on
    ``(B, T, 3)`` logits (padding labels are clamped), rewards :func:`expected_label_rewards`.
    """
    if cls_loss == "mse":
        return (outputs - labels.to(outputs.dtype)) ** 2, outputs
    logp = F.log_softmax(outputs.to(torch.promote_types(outputs.dtype, torch.float32)), dim=-1)
    ce = -logp.gather(-1, (labels.long() + 1).clamp(0, 2).unsqueeze(-1)).squeeze(-1)
    return ce, expected_label_rewards(outputs)
