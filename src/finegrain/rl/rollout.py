"""Rollouts: batched sampling from a causal LM with its KV cache, and the log-probs of what was sampled.

:func:`sample_rollouts` takes left-padded prompts and returns a :class:`finegrain.types.CompletionBatch` in the
shared layout (prompt block as given, response block right-padded with the pad id). It is an explicit decode
loop over the model's own KV cache rather than ``model.generate``, for three reasons: sampling draws from a
caller-supplied ``torch.Generator`` (reproducible without touching the global RNG), no generation config is
read or written (so no pad/EOS warnings and no hidden sampling defaults), and the per-step work is only the
forward pass plus the sampling arithmetic. Temperature, top-k and top-p go through ``transformers``' logits
warpers in their order, so for one seed of the global RNG the two sample the same tokens.

:func:`score_rollout` scores a batch in that layout under the policy and the reference, a few rows at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from finegrain.models.forward import forward_params, hidden_states, output_head, predicting_states
from finegrain.ops.kl import reverse_kl_from_logits
from finegrain.ops.logprobs import token_entropy, token_logps
from finegrain.ops.masked import zero_masked
from finegrain.types import CompletionBatch

__all__ = ["left_pad_prompts", "resolve_special_ids", "sample_next_token", "sample_prompts", "sample_rollouts",
           "score_rollout", "take_rows"]


def _as_list(ids: Any) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def resolve_special_ids(
    model: nn.Module,
    tokenizer: Any = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> tuple[list[int], int]:
    """The EOS ids that stop a response and the id that pads the response block.

    EOS: ``eos_token_id`` when given; otherwise every id named by the model's generation config and the
    tokenizer (chat models often end a turn with a token the tokenizer does not call EOS), falling back to
    ``model.config.eos_token_id``. Pad: ``pad_token_id``, else the tokenizer's, the generation config's, the
    model config's, else the first EOS id (padding is masked out, so any id works).

    Args:
        model: a causal LM.
        tokenizer: optional tokenizer (anything with ``eos_token_id`` / ``pad_token_id`` attributes).
        eos_token_id: explicit EOS id or ids.
        pad_token_id: explicit pad id.

    Returns:
        ``(eos_ids, pad_id)``.

    Raises:
        ValueError: no EOS id can be found.
    """
    gen = getattr(model, "generation_config", None)
    cfg = getattr(model, "config", None)
    if eos_token_id is not None:
        eos = _as_list(eos_token_id)
    else:
        eos = _as_list(getattr(gen, "eos_token_id", None)) + _as_list(getattr(tokenizer, "eos_token_id", None))
        if not eos:
            eos = _as_list(getattr(cfg, "eos_token_id", None))
    eos = list(dict.fromkeys(eos))
    if not eos:
        raise ValueError("no EOS token id: pass eos_token_id= or a tokenizer with an eos_token")
    if pad_token_id is None:
        for owner in (tokenizer, gen, cfg):
            pad_token_id = getattr(owner, "pad_token_id", None)
            if pad_token_id is not None:
                break
    return eos, int(pad_token_id) if pad_token_id is not None else eos[0]


def sample_next_token(
    logits: torch.Tensor,
    *,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from ``logits`` ``(N, V)`` → ``(N,)`` long.

    Greedy (``argmax``) when ``do_sample`` is False or ``temperature`` is 0. Otherwise, as ``transformers``'
    warpers (``TopKLogitsWarper``, ``TopPLogitsWarper``) in this order: divide by ``temperature``; keep the
    ``top_k`` largest logits (0 = all; ties with the k-th are kept); keep the smallest set of largest-probability
    tokens whose mass reaches ``top_p`` (at least one); then sample from the softmax with ``torch.multinomial``
    (float32).

    Example:
        >>> sample_next_token(torch.tensor([[0.0, 5.0, 1.0]]), do_sample=False)
        tensor([1])
    """
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k < scores.shape[-1]:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the model's forward takes ``name``; a PEFT wrapper forwards ``**kwargs``, so ask its base model."""
    get_base = getattr(model, "get_base_model", None)
    return name in forward_params(get_base() if callable(get_base) else model)


def _check_prompts(prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor) -> torch.Tensor:
    if prompt_input_ids.dim() != 2 or prompt_input_ids.shape != prompt_attention_mask.shape:
        raise ValueError(
            f"prompt_input_ids {tuple(prompt_input_ids.shape)} and prompt_attention_mask "
            f"{tuple(prompt_attention_mask.shape)} must both be (N, P)"
        )
    attn = prompt_attention_mask.to(torch.bool)
    empty = (~attn.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prompt rows {empty[:10]} are empty; every prompt needs at least one token (e.g. BOS)")
    # Left padding: once a row's mask turns on it stays on. Right-padded prompts would put pad tokens between
    # the prompt and the response and silently change every sampled token.
    if bool((attn[:, 1:] < attn[:, :-1]).any()):
        raise ValueError("prompts must be left-padded (tokenizer.padding_side = 'left')")
    return attn


@torch.no_grad()
def sample_rollouts(
    model: nn.Module,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    tokenizer: Any = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> CompletionBatch:
    """Sample responses to left-padded prompts with the KV cache; stop each row at its first EOS.

    Decoding: one prefill forward over the prompts (position ids from the attention mask, only the last
    position's logits computed where the model supports ``logits_to_keep``), then one cached forward per new
    token. A row that has emitted EOS is fed the pad id until every row has finished or ``max_new_tokens`` is
    reached. Call with the model in eval mode (dropout off) for on-policy samples.

    Args:
        model: a Hugging Face causal LM (or anything with the same forward / cache interface).
        prompt_input_ids: ``(N, P)`` long, left-padded; every row has at least one real token.
        prompt_attention_mask: ``(N, P)``, 1 on real prompt tokens.
        max_new_tokens: the most response tokens per row.
        do_sample: sample (True) or decode greedily (False).
        temperature: softmax temperature (> 0; 0 means greedy).
        top_k: keep the ``k`` most likely tokens (0 = off).
        top_p: nucleus mass (1.0 = off).
        num_samples: responses per prompt; rows come out prompt-major (``repeat_interleave``), as RLOO expects.
        tokenizer: optional, supplies EOS and pad ids (see :func:`resolve_special_ids`).
        eos_token_id: explicit EOS id(s).
        pad_token_id: explicit pad id.
        generator: ``torch.Generator`` on the model's device for reproducible sampling (None: global RNG).

    Returns:
        A :class:`CompletionBatch` of ``N·num_samples`` rows: the prompt block as given (repeated),
        ``completion_input_ids`` ``(N·k, T)`` with ``T <= max_new_tokens`` the longest response, right-padded with
        the pad id; ``completion_mask`` ``(N·k, T)`` True up to and including the first EOS (a row without EOS is
        True on all ``max_new_tokens`` tokens); ``extras["truncated"]`` ``(N·k,)`` bool, True where no EOS came.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    attn = _check_prompts(prompt_input_ids, prompt_attention_mask)
    eos_ids, pad_id = resolve_special_ids(model, tokenizer, eos_token_id, pad_token_id)
    if num_samples > 1:
        prompt_input_ids = prompt_input_ids.repeat_interleave(num_samples, dim=0)
        prompt_attention_mask = prompt_attention_mask.repeat_interleave(num_samples, dim=0)
        attn = attn.repeat_interleave(num_samples, dim=0)

    n, p = prompt_input_ids.shape
    device = prompt_input_ids.device
    eos = torch.tensor(eos_ids, device=device)
    # The whole attention mask is allocated once; step s reads its first P + s + 1 columns.
    attention = torch.cat([attn.long(), torch.ones(n, max_new_tokens, dtype=torch.long, device=device)], dim=1)
    positions = (attn.long().cumsum(dim=1) - 1).clamp(min=0)
    next_position = attn.sum(dim=1, keepdim=True)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    # transformers 5.24 renamed the KV cache's ``past_key_values`` to ``cache`` (in the forward's arguments
    # and its output; the old name warns and goes in 5.40); earlier 5.x releases know only
    # ``past_key_values``.
    cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"

    out = model(
        input_ids=prompt_input_ids, attention_mask=attention[:, :p], position_ids=positions, use_cache=True, **extra
    )
    tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    pad = torch.tensor(pad_id, device=device)
    steps = max_new_tokens
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        token = sample_next_token(
            logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        token = torch.where(finished, pad, token)
        tokens[:, step] = token
        finished = finished | torch.isin(token, eos)
        # Stop as soon as every row has ended, and never run a forward whose logits would not be used.
        if step == max_new_tokens - 1 or bool(finished.all()):
            steps = step + 1
            break
        out = model(
            input_ids=token[:, None],
            attention_mask=attention[:, : p + step + 1],
            position_ids=next_position + step,
            use_cache=True,
            **{cache_arg: out.past_key_values if getattr(out, "cache", None) is None else out.cache},
        )
    del out

    tokens = tokens[:, :steps]
    is_eos = torch.isin(tokens, eos)
    # True up to and including the first EOS: no EOS strictly before this position. (The pad id may equal the
    # EOS id; pads only ever follow the first EOS, so they are excluded either way.)
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    completion_mask = eos_before == 0
    tokens = torch.where(completion_mask, tokens, pad)
    return CompletionBatch(
        prompt_input_ids=prompt_input_ids,
        prompt_attention_mask=prompt_attention_mask,
        completion_input_ids=tokens,
        completion_mask=completion_mask,
        extras={"truncated": ~is_eos.any(dim=1)},
    )


def left_pad_prompts(model: nn.Module, tokenizer: Any, prompts: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``(N, P)`` of raw prompts on the model's device: each rendered by
    :func:`finegrain.data.tokenize.tokenize_prompt` (chat template for a conversation), left-padded with the pad id
    of :func:`resolve_special_ids` (the prompt block of :func:`finegrain.data.collate.collate_completions`)."""
    from finegrain.data.collate import collate_completions
    from finegrain.data.tokenize import tokenize_prompt

    _, pad_id = resolve_special_ids(model, tokenizer)
    rows = [{"prompt_input_ids": tokenize_prompt(tokenizer, p), "completion_input_ids": []} for p in prompts]
    batch = collate_completions(rows, pad_id)
    device = next(model.parameters()).device
    return batch.prompt_input_ids.to(device), batch.prompt_attention_mask.to(device)


def sample_prompts(model: nn.Module, tokenizer: Any, prompts: Sequence[Any], **sampling: Any) -> CompletionBatch:
    """:func:`sample_rollouts` (``**sampling``: its keyword arguments but ``tokenizer``) on the prompts of
    :func:`left_pad_prompts`, with ``responses`` set to the decoded texts
    (:func:`finegrain.rewards.base.decode_responses`: up to the first EOS, special tokens dropped, stripped); rows
    are prompt-major."""
    from finegrain.rewards.base import decode_responses

    batch = sample_rollouts(model, *left_pad_prompts(model, tokenizer, prompts), tokenizer=tokenizer, **sampling)
    batch.responses = decode_responses(tokenizer, batch)
    return batch


def take_rows(batch: CompletionBatch, rows: slice | torch.Tensor) -> tuple[CompletionBatch, int]:
    """Rows ``rows`` of ``batch`` without the prompt columns that are padding in all of them and without the
    response columns after their longest response. Returns the sub-batch and its response width ``T'``;
    per-token tensors of the rows are ``x[rows, :T']``."""
    attn = batch.prompt_attention_mask[rows].to(torch.bool)
    mask = batch.completion_mask[rows].to(torch.bool)
    first = int(attn.any(dim=0).long().argmax()) if bool(attn.any()) else 0
    width = int(mask.any(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1
    sub = CompletionBatch(
        prompt_input_ids=batch.prompt_input_ids[rows, first:],
        prompt_attention_mask=batch.prompt_attention_mask[rows, first:],
        completion_input_ids=batch.completion_input_ids[rows, :width],
        completion_mask=mask[:, :width],
    )
    return sub, width


def _predicting_logits(model: nn.Module, batch: CompletionBatch, temperature: float) -> torch.Tensor:
    logits = output_head(model)(predicting_states(hidden_states(model, batch), batch))
    return logits / temperature if temperature != 1.0 else logits


@torch.no_grad()
def score_rollout(
    model: nn.Module,
    batch: CompletionBatch,
    *,
    ref_model: nn.Module | None = None,
    ref_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    chunk_rows: int = 8,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_full_kl: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token log-probs of a rollout under the policy and the reference, in the response layout.

    ``token_logps[i, t] = log softmax(z^θ_{i,t} / τ)[y_{i,t}]`` where ``z_{i,t}`` are the logits of the state that
    predicts response token ``t`` (:func:`finegrain.models.forward.predicting_states`) and ``τ`` the sampling
    temperature (the ratio of PPO is then taken against the distribution that was sampled, as in TRL). Rows are
    processed ``chunk_rows`` at a time, each chunk trimmed to its own prompt and response widths, so logits are
    at most ``(chunk_rows, T, V)`` per model.

    The reference is ``ref_model``; or, for a LoRA policy whose reference is the base model, pass
    ``ref_context=policy.disable_adapter`` (no ``ref_model``) and the policy is run inside that context.

    Args:
        model: the policy (a causal LM).
        batch: a :class:`CompletionBatch` (e.g. from :func:`sample_rollouts`).
        ref_model: the reference model, or None.
        ref_context: a zero-argument callable returning a context manager under which the reference is run.
        chunk_rows: rows per forward pass.
        temperature: divide both models' logits by it.
        with_entropy: also return the policy entropy ``H(p^θ_t)``.
        with_full_kl: also return ``K̃_t = KL(p^θ_t ‖ p^ref_t)`` over the vocabulary (needs a reference).

    Returns:
        A dict of ``(N, T)`` float32 tensors, exactly 0 where ``completion_mask`` is False: ``"token_logps"``;
        with a reference ``"ref_token_logps"``; ``"entropy"`` and ``"full_kl"`` when asked for.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    has_ref = ref_model is not None or ref_context is not None
    if with_full_kl and not has_ref:
        raise ValueError("with_full_kl needs ref_model or ref_context")
    reference = ref_model if ref_model is not None else model
    enter_ref = ref_context if ref_context is not None else contextlib.nullcontext

    n, t = batch.completion_input_ids.shape
    keys = ["token_logps"] + ["ref_token_logps"] * has_ref + ["entropy"] * with_entropy + ["full_kl"] * with_full_kl
    out = {key: torch.zeros(n, t, dtype=torch.float32, device=batch.completion_input_ids.device) for key in keys}
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        sub, width = take_rows(batch, rows)
        ids, mask = sub.completion_input_ids, sub.completion_mask
        logits = _predicting_logits(model, sub, temperature)
        out["token_logps"][rows, :width] = token_logps(logits, ids, mask).float()
        if with_entropy:
            out["entropy"][rows, :width] = zero_masked(token_entropy(logits).float(), mask)
        if has_ref:
            with enter_ref():
                ref_logits = _predicting_logits(reference, sub, temperature)
            out["ref_token_logps"][rows, :width] = token_logps(ref_logits, ids, mask).float()
            if with_full_kl:
                out["full_kl"][rows, :width] = reverse_kl_from_logits(logits, ref_logits, mask).float()
            del ref_logits
        del logits
    return out
