"""Per-token statistics over the full vocabulary, computed from hidden states in chunks.

TDPO needs, at every response position, the policy log-prob of the label, the reference log-prob of the label and
the forward KL ``K_t = KL(p_ref(·|s_t) ‖ p_θ(·|s_t))`` over the whole vocabulary (TDPO: Zeng et al., ICML 2024,
arXiv 2404.11999; docs/methods/tdpo.md). Building both models' ``(N, T, V)`` logits, their log-softmaxes and the
autograd buffers costs several ``N·T·V`` tensors; for ``N·T = 8k`` and ``V = 128k`` in float32 that is 4 GiB per
tensor. :func:`completion_stats` instead:

1. gathers the masked-in positions of the final hidden states (``M`` rows; padding is never projected),
2. applies the output projection to ``chunk_size`` rows at a time and reduces each chunk to three numbers per row,
3. scatters the results back to the response layout ``(N, T)`` (0 at masked positions),
4. in backward, recomputes each chunk's logits instead of storing them, using the closed-form gradient
   ``∂/∂z^θ = g_logp · (onehot(y) − p_θ) + g_kl · (p_θ − p_ref)``.

Peak extra memory is one ``(chunk_size, V)`` buffer of policy logits, worked on in place, plus a quarter of one for
the reference's logits (computed in sub-blocks of ``ceil(chunk_size / 4)`` rows), plus one ``(V, H)`` weight
gradient: at ``N·T = 2k`` response tokens, ``V = 49k`` and chunks of 1024 rows, about a fifth of the naive path's
peak (docs/benchmarks.md, "smollm2"). The KL is formed in the logit domain,
``log p_θ − log p_ref = (z^θ − z^ref) − (lse^θ − lse^ref)``, where every term is finite. Compared with TDPO's official
code, which takes ``log(softmax(z_ref))`` (docs/methods/tdpo.md), a reference probability that underflows to 0 thus
contributes 0 to the KL rather than ``0·(−inf) = NaN``.

Hidden states come from :func:`finegrain.models.forward.hidden_states` sliced by
:func:`~finegrain.models.forward.predicting_states` (row ``t`` predicts response token ``t``; no label shift here),
and the head from ``model.get_output_embeddings()`` (``.weight``, ``.bias``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finegrain.ops.masked import zero_masked

__all__ = ["CompletionStats", "completion_stats", "naive_completion_stats"]


@dataclass
class CompletionStats:
    """Per-token statistics in the response layout, exactly 0 where the completion mask is False.

    Fields:
        token_logps: ``(N, T)`` ``log π_θ(y_t | s_t)``; differentiable w.r.t. the policy's hidden states and head.
        ref_token_logps: ``(N, T)`` ``log π_ref(y_t | s_t)``, no gradient; None without reference inputs.
        token_kl: ``(N, T)`` ``KL(π_ref(·|s_t) ‖ π_θ(·|s_t))`` (forward, reference first); differentiable w.r.t. the
            policy inputs; None unless ``compute_kl``.
    """

    token_logps: torch.Tensor
    ref_token_logps: torch.Tensor | None = None
    token_kl: torch.Tensor | None = None


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax statistics of half-precision logits lose too much in their own dtype; float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _project(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    keep_tanh: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``(c, V)`` of ``c`` hidden rows in the statistics dtype, soft-capped as the model's forward does.

    With ``keep_tanh`` the soft-cap's ``tanh(u / cap)`` is returned too (its derivative is ``1 - tanh²``).
    """
    z = F.linear(h, weight, bias)
    stat = _stat_dtype(weight.dtype)
    if z.dtype != stat:
        z = z.to(stat)
    if softcap is None:
        return z, None
    if keep_tanh:
        t = z.div_(softcap).tanh_()
        return t * softcap, t
    return z.div_(softcap).tanh_().mul_(softcap), None


_LSE_ROWS = 64


def _ref_blocks(start: int, m: int, chunk_size: int) -> list[tuple[slice, slice]]:
    """The reference's sub-blocks of the chunk at ``start`` (of ``m`` rows), a quarter of a chunk each, as
    ``(rows, rows within the chunk)``."""
    stop, size = min(start + chunk_size, m), max(1, -(-chunk_size // 4))
    ends = [(i, min(i + size, stop)) for i in range(start, stop, size)]
    return [(slice(i, j), slice(i - start, j - start)) for i, j in ends]


def _logsumexp(z: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dimension of ``(c, V)`` logits, ``_LSE_ROWS`` rows at a time: torch's
    ``logsumexp`` builds an ``exp(z - max)`` temporary of its input's size, which for a whole chunk would be one more
    ``(c, V)`` buffer at the chunk's peak."""
    if z.shape[0] <= _LSE_ROWS:
        return torch.logsumexp(z, dim=-1)
    return torch.cat([torch.logsumexp(part, dim=-1) for part in z.split(_LSE_ROWS)])


class _ChunkedCompletionStats(torch.autograd.Function):
    """Chunked forward/backward over ``M`` gathered rows; see :func:`completion_stats` for the maths."""

    @staticmethod
    def forward(ctx, h, w, b, hr, wr, br, y, compute_kl, chunk_size, softcap):
        stat = _stat_dtype(w.dtype)
        m = h.shape[0]
        has_ref = hr is not None
        logp_y = torch.empty(m, dtype=stat, device=h.device)
        lse = torch.empty(m, dtype=stat, device=h.device)
        ref_logp_y = torch.empty(m if has_ref else 0, dtype=stat, device=h.device)
        ref_lse = torch.empty(m if has_ref else 0, dtype=stat, device=h.device)
        kl = torch.empty(m if compute_kl else 0, dtype=stat, device=h.device)
        with torch.autocast(device_type=h.device.type, enabled=False):
            for start in range(0, m, chunk_size):
                rows = slice(start, start + chunk_size)
                yc = y[rows].unsqueeze(1)
                z, _ = _project(h[rows], w, b, softcap)
                lse_c = _logsumexp(z)
                lse[rows] = lse_c
                logp_y[rows] = z.gather(1, yc).squeeze(1) - lse_c
                if not has_ref:
                    del z
                    continue
                # the reference's logits in sub-blocks: one (c, V) buffer for the chunk plus a quarter of one
                for sub, local in _ref_blocks(start, m, chunk_size):
                    zr, _ = _project(hr[sub], wr, br, softcap)
                    ref_lse_s = _logsumexp(zr)
                    ref_lse[sub] = ref_lse_s
                    ref_logp_y[sub] = zr.gather(1, yc[local]).squeeze(1) - ref_lse_s
                    if compute_kl:
                        # log p_ref − log p_θ = (zr − z) − (ref_lse − lse), formed in the logit domain where every
                        # term is finite: a reference probability that underflows to 0 multiplies a finite number.
                        d = torch.sub(zr, z[local], out=z[local])  # in place: z's rows now hold zr − z
                        d.sub_((ref_lse_s - lse_c[local]).unsqueeze(1))
                        q = zr.sub_(ref_lse_s.unsqueeze(1)).exp_()  # in place: zr now holds p_ref
                        kl[sub] = torch.bmm(q.unsqueeze(1), d.unsqueeze(2)).view(-1)  # Σ q (log q − log p)
                        del d, q
                    del zr
                del z
        ctx.compute_kl, ctx.chunk_size, ctx.softcap = compute_kl, chunk_size, softcap
        ctx.save_for_backward(h, w, b, hr, wr, br, y, lse, ref_lse)
        ctx.mark_non_differentiable(ref_logp_y)
        return logp_y, ref_logp_y, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, _g_ref, g_kl):
        h, w, b, hr, wr, br, y, lse, ref_lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        stat = _stat_dtype(w.dtype)
        compute_kl, chunk_size, softcap = ctx.compute_kl, ctx.chunk_size, ctx.softcap
        g_logp = g_logp.to(stat)
        g_kl = g_kl.to(stat) if compute_kl else None
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=stat, device=w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=stat, device=w.device) if need_b and b is not None else None
        with torch.autocast(device_type=h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                gl = g_logp[rows].unsqueeze(1)
                z, t = _project(h[rows], w, b, softcap, keep_tanh=True)
                g = z.sub_(lse[rows].unsqueeze(1)).exp_()  # in place: p_θ
                if compute_kl:
                    gk = g_kl[rows].unsqueeze(1)
                    # g_logp·(onehot − p) + g_kl·(p − q) = p·(g_kl − g_logp) − g_kl·q + g_logp·onehot
                    g.mul_(gk - gl)
                    for sub, local in _ref_blocks(start, h.shape[0], chunk_size):
                        zr, _ = _project(hr[sub], wr, br, softcap)
                        q = zr.sub_(ref_lse[sub].unsqueeze(1)).exp_()
                        g[local].addcmul_(q, gk[local], value=-1.0)
                        del zr, q
                else:
                    g.mul_(-gl)
                g.scatter_add_(1, y[rows].unsqueeze(1), gl)
                if t is not None:
                    g.mul_(t.square_().neg_().add_(1.0))  # d(cap·tanh(u/cap))/du = 1 − tanh²
                del z, t
                if grad_b is not None:
                    grad_b += g.sum(dim=0)
                g = g.to(w.dtype)
                if need_h:
                    grad_h[rows] = g @ w
                if need_w and w.dtype == stat:
                    grad_w.addmm_(g.t(), h[rows])  # accumulate in place: no (V, H) temporary per chunk
                elif need_w:
                    grad_w += (g.t() @ h[rows]).to(stat)
                del g
        grad_w = grad_w.to(w.dtype) if grad_w is not None else None
        grad_b = grad_b.to(b.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def _check_inputs(policy_hidden, policy_weight, labels, mask, policy_bias, ref_hidden, ref_weight, ref_bias,
                  compute_kl, chunk_size, logit_softcap) -> None:
    if policy_hidden.dim() != 3:
        raise ValueError(f"policy_hidden must be (N, T, H), got {tuple(policy_hidden.shape)}")
    n, t, hsz = policy_hidden.shape
    if policy_weight.dim() != 2 or policy_weight.shape[1] != hsz:
        raise ValueError(f"policy_weight must be (V, {hsz}), got {tuple(policy_weight.shape)}")
    vocab = policy_weight.shape[0]
    if labels.shape != (n, t) or mask.shape != (n, t):
        raise ValueError(f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must both be ({n}, {t})")
    if policy_bias is not None and policy_bias.shape != (vocab,):
        raise ValueError(f"policy_bias must be ({vocab},), got {tuple(policy_bias.shape)}")
    if compute_kl and ref_hidden is None:
        raise ValueError("compute_kl=True needs ref_hidden (the reference model's final hidden states)")
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias given without ref_hidden")
    if ref_hidden is not None:
        if ref_hidden.dim() != 3 or ref_hidden.shape[:2] != (n, t):
            raise ValueError(f"ref_hidden must be ({n}, {t}, H_ref), got {tuple(ref_hidden.shape)}")
        if ref_weight is None and ref_bias is not None:
            raise ValueError("ref_bias given without ref_weight; pass both, or neither to reuse the policy head")
        rw = policy_weight if ref_weight is None else ref_weight
        if rw.dim() != 2 or rw.shape != (vocab, ref_hidden.shape[2]):
            raise ValueError(f"ref_weight must be ({vocab}, {ref_hidden.shape[2]}), got {tuple(rw.shape)}")
        if ref_bias is not None and ref_bias.shape != (vocab,):
            raise ValueError(f"ref_bias must be ({vocab},), got {tuple(ref_bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be positive or None, got {logit_softcap}")


def completion_stats(
    policy_hidden: torch.Tensor,
    policy_weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    policy_bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    compute_kl: bool,
    chunk_size: int = 1024,
    logit_softcap: float | None = None,
) -> CompletionStats:
    """Token log-probs, reference token log-probs and forward token KL, without ``(N, T, V)`` logits.

    With ``z^θ_t = W h_t + b`` (then ``cap·tanh(z/cap)`` if ``logit_softcap``), ``log p^θ_t = log_softmax(z^θ_t)``
    and likewise for the reference:

    * ``token_logps[n, t] = log p^θ_t(y_t)`` (``ℓ^θ_t``),
    * ``ref_token_logps[n, t] = log p^ref_t(y_t)`` (``ℓ^ref_t``),
    * ``token_kl[n, t] = Σ_v p^ref_t(v) (log p^ref_t(v) − log p^θ_t(v))`` (``K_t``, TDPO's sequential-KL term; see
      the module docstring), with ``p^ref = exp(log_softmax(z^ref))``.

    Only masked-in positions are computed; every output is 0 elsewhere (whatever the hidden states or labels
    hold there). Gradients flow exactly to ``policy_hidden``, ``policy_weight`` and ``policy_bias``, by a backward
    that recomputes each chunk's logits; reference inputs never receive gradient. Double backward is not
    supported. Naive equivalent (same values and gradients, ``O(N·T·V)`` memory): :func:`naive_completion_stats`.

    The head is applied in the dtype of its weight (autocast is switched off inside; ``policy_hidden`` is cast to
    it), and the softmax statistics are computed in float32 (float64 for float64 weights); the outputs have
    that statistics dtype.

    Args:
        policy_hidden: ``(N, T, H)`` final hidden states of the policy that predict each response token.
        policy_weight: ``(V, H)`` policy output-embedding weight.
        labels: ``(N, T)`` long response token ids, in ``[0, V)`` where ``mask`` is True (anything elsewhere).
        mask: ``(N, T)`` bool ``completion_mask``.
        policy_bias: ``(V,)`` or None.
        ref_hidden: ``(N, T, H_ref)`` reference hidden states, or None (then no reference outputs).
        ref_weight: ``(V, H_ref)`` reference output weight; None reuses the (detached) policy head, which is right
            when the reference shares the policy's head (e.g. a LoRA policy with its adapter disabled).
        ref_bias: ``(V,)`` or None; only together with ``ref_weight``.
        compute_kl: compute ``token_kl`` (needs ``ref_hidden``).
        chunk_size: gathered rows per chunk; peak memory grows as ``1.25 · chunk_size · V`` (module docstring).
        logit_softcap: final-logit soft-cap of the model family (Gemma 2's ``final_logit_softcapping``), applied
            to both models, or None.

    Returns:
        :class:`CompletionStats` of ``(N, T)`` tensors (its fields say which are None).

    Example:
        >>> h, w = torch.zeros(1, 2, 3), torch.zeros(4, 3)
        >>> stats = completion_stats(h, w, torch.tensor([[1, 0]]), torch.tensor([[True, False]]),
        ...                          ref_hidden=h, compute_kl=True)
        >>> stats.token_logps, stats.token_kl
        (tensor([[-1.3863,  0.0000]]), tensor([[0., 0.]]))
    """
    _check_inputs(policy_hidden, policy_weight, labels, mask, policy_bias, ref_hidden, ref_weight, ref_bias,
                  compute_kl, chunk_size, logit_softcap)
    n, t, _ = policy_hidden.shape
    mask = mask.to(device=policy_hidden.device, dtype=torch.bool)
    y = labels[mask]
    vocab = policy_weight.shape[0]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= vocab):
        raise ValueError(f"labels at masked-in positions must lie in [0, {vocab}); got [{int(y.min())}, {int(y.max())}]")
    # Boolean indexing gathers the M masked-in rows (row-major), so padding is never projected onto V.
    h = policy_hidden[mask].to(policy_weight.dtype)
    hr = wr = br = None
    if ref_hidden is not None:
        wr, br = (policy_weight, policy_bias) if ref_weight is None else (ref_weight, ref_bias)
        wr, br = wr.detach(), None if br is None else br.detach()
        hr = ref_hidden.detach()[mask].to(wr.dtype)
    logp_y, ref_logp_y, kl = _ChunkedCompletionStats.apply(
        h, policy_weight, policy_bias, hr, wr, br, y, compute_kl, chunk_size, logit_softcap
    )

    def scatter(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(n, t).masked_scatter(mask, values)

    return CompletionStats(
        token_logps=scatter(logp_y),
        ref_token_logps=scatter(ref_logp_y) if ref_hidden is not None else None,
        token_kl=scatter(kl) if compute_kl else None,
    )


def naive_completion_stats(
    policy_hidden: torch.Tensor,
    policy_weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    policy_bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    compute_kl: bool,
    chunk_size: int = 1024,
    logit_softcap: float | None = None,
) -> CompletionStats:
    """The straightforward version of :func:`completion_stats`: full ``(N, T, V)`` logits of both models.

    Same signature (arguments and shapes as documented there), values, ``(N, T)`` outputs and gradients
    (autograd through ``log_softmax``); ``chunk_size`` is ignored. Memory is ``O(N·T·V)`` per intermediate, so
    use it for tests and benchmarks only.
    """
    del chunk_size
    _check_inputs(policy_hidden, policy_weight, labels, mask, policy_bias, ref_hidden, ref_weight, ref_bias,
                  compute_kl, 1, logit_softcap)
    mask = mask.to(torch.bool)
    stat = _stat_dtype(policy_weight.dtype)
    safe = zero_masked(labels, mask).unsqueeze(-1)

    def logits(h, w, b):
        z = F.linear(h.to(w.dtype), w, b).to(stat)
        return z if logit_softcap is None else torch.tanh(z / logit_softcap) * logit_softcap

    log_p = F.log_softmax(logits(policy_hidden, policy_weight, policy_bias), dim=-1)
    stats = CompletionStats(token_logps=zero_masked(log_p.gather(-1, safe).squeeze(-1), mask))
    if ref_hidden is not None:
        with torch.no_grad():
            if ref_weight is None:
                ref_weight, ref_bias = policy_weight, policy_bias
            log_q = F.log_softmax(logits(ref_hidden, ref_weight, ref_bias), dim=-1)
        stats.ref_token_logps = zero_masked(log_q.gather(-1, safe).squeeze(-1), mask)
        if compute_kl:
            kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
            stats.token_kl = zero_masked(kl, mask)
    return stats
