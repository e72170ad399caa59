"""Implicit token rewards of a trained policy against its reference (DPO / TDPO; docs/methods/tdpo.md).

A policy trained by DPO (Rafailov et al., NeurIPS 2023, arXiv 2305.18290) defines the token reward ``β ρ_t``
with ``ρ_t = log π_θ(y_t | s_t) − log π_ref(y_t | s_t)``; one trained by TDPO (Zeng et al., ICML 2024,
arXiv 2404.11999) defines ``β (ρ_t + K_t)`` with the forward token KL ``K_t = KL(π_ref(·|s_t) ‖ π_θ(·|s_t))``
over the whole vocabulary. Summed over a response they are the sequence rewards the trainers log
(``rewards/chosen`` ...). :class:`ImplicitRewardSource` computes them for any batch in the shared layout, so a
preference-trained policy can score rollouts for PPO, regularise T-REG (``reg_source=dpo_implicit`` does the same
thing inside ``finegrain po``) or have its token credit evaluated against the built-in world's ground truth.
"""

from __future__ import annotations

import contextlib

import torch

from finegrain.rewards.contrastive import implicit_token_rewards

__all__ = ["IMPLICIT_KINDS", "ImplicitRewardSource"]

IMPLICIT_KINDS = ("dpo", "tdpo")


class ImplicitRewardSource:
    """Token rewards ``β ρ_t`` (``kind="dpo"``) or ``β (ρ_t + K_t)`` (``kind="tdpo"``) of a policy vs a reference.

    Both models read the batch once (the reference under ``no_grad``); the output heads are applied in chunks
    (:func:`finegrain.ops.chunked.completion_stats`), so neither model's ``(N, T, V)`` logits exist at once, also for
    TDPO's full-vocabulary KL.

    Args:
        policy: the trained causal LM.
        beta: ``β`` the policy was trained with (the rewards scale with it).
        ref_model: the reference causal LM, or None with ``ref_context``.
        ref_context: zero-argument callable returning a context manager under which ``policy`` *is* the reference
            (a LoRA policy's ``disable_adapter``); used when ``ref_model`` is None.
        kind: ``"dpo"`` or ``"tdpo"``.
        chunk_size: response positions per chunk of the output projection.

    Example:
        ``ImplicitRewardSource(policy, 0.1, ref_model=sft_model).token_rewards(batch).values`` is ``(N, T)``.
    """

    def __init__(self, policy, beta: float, *, ref_model=None, ref_context=None, kind: str = "dpo",
                 chunk_size: int = 1024):
        if kind not in IMPLICIT_KINDS:
            raise ValueError(f"implicit reward kind must be one of {', '.join(IMPLICIT_KINDS)}; got {kind!r}")
        if ref_model is None and ref_context is None:
            raise ValueError("ImplicitRewardSource needs ref_model, or ref_context for a LoRA policy")
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.policy, self.beta, self.ref_model, self.ref_context = policy, beta, ref_model, ref_context
        self.kind, self.chunk_size = kind, chunk_size
        self.name = f"implicit_{kind}"

    @torch.no_grad()
    def token_rewards(self, batch):
        """Rewards for the ``N`` rows of ``batch`` (a :class:`~finegrain.types.CompletionBatch`).

        Returns:
            :class:`~finegrain.types.TokenRewards` with ``values (N, T)`` (0 where the mask is False), ``mask`` the
            completion mask, ``seq_reward (N,)`` the sum over the response, and ``meta`` holding ``token_logps``,
            ``ref_token_logps`` and (TDPO) ``token_kl``, each ``(N, T)``.
        """
        from finegrain.models.forward import hidden_states, lm_head, predicting_states
        from finegrain.ops.chunked import completion_stats
        from finegrain.types import TokenRewards

        mask = batch.completion_mask.to(torch.bool)
        h = predicting_states(hidden_states(self.policy, batch), batch)
        ref = self.policy if self.ref_model is None else self.ref_model  # the policy: under ref_context
        with self.ref_context() if self.ref_model is None else contextlib.nullcontext():
            hr = predicting_states(hidden_states(ref, batch), batch)
        w, b, cap = lm_head(self.policy)
        ref_w, ref_b, _ = lm_head(ref)
        if ref_w is w:  # one head (the adapter-disabled policy's is the policy's frozen one): read once
            ref_w, ref_b = None, None
        stats = completion_stats(h, w, batch.completion_input_ids, mask, policy_bias=b, ref_hidden=hr,
                                 ref_weight=ref_w, ref_bias=ref_b, compute_kl=self.kind == "tdpo",
                                 chunk_size=self.chunk_size, logit_softcap=cap)
        values = implicit_token_rewards(stats.token_logps, stats.ref_token_logps, mask, self.beta,
                                        token_kl=stats.token_kl).float()
        meta = {"token_logps": stats.token_logps, "ref_token_logps": stats.ref_token_logps}
        if stats.token_kl is not None:
            meta["token_kl"] = stats.token_kl
        return TokenRewards(values=values, mask=mask, seq_reward=values.sum(dim=-1), meta=meta)
