"""Forward passes of any Hugging Face causal LM in finegrain's batch layout.

The batch layout (see :mod:`finegrain.types`) puts a left-padded prompt block of ``P`` columns before a
right-padded response block of ``T`` columns. Position ids are computed from the attention mask so that
left padding never changes a hidden state. Two slices of the final hidden states matter:

* ``hidden[:, P-1 : P-1+T]`` -- the states that *predict* each response token (policy log-probs, KL);
* ``hidden[:, P : P+T]`` -- the states *after reading* each response token (token-level reward heads,
  ``r(x, y_<=t)``).

The language-model head is applied by the caller (possibly in chunks), so full ``(N, L, V)`` logits are
never built here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from finegrain.types import CompletionBatch


def model_inputs(batch: CompletionBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate the prompt and response blocks into model inputs.

    Returns:
        ``input_ids (N, P+T)``, ``attention_mask (N, P+T)`` and ``position_ids (N, P+T)`` where position ids
        count real tokens only (padding gets position 0 and is masked out anyway).
    """
    input_ids = torch.cat([batch.prompt_input_ids, batch.completion_input_ids], dim=1)
    attention_mask = torch.cat(
        [batch.prompt_attention_mask.long(), batch.completion_mask.long()], dim=1
    )
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def decoder(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (no LM head), for HF and PEFT-wrapped models alike."""
    get_decoder = getattr(model, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else None
    if body is None:
        raise TypeError(
            f"{type(model).__name__} does not expose its decoder through get_decoder(); finegrain needs the final "
            "hidden states of a causal LM (AutoModelForCausalLM)."
        )
    return body


def hidden_states(model: nn.Module, batch: CompletionBatch) -> torch.Tensor:
    """Final hidden states ``(N, P+T, H)`` (after the final norm) of ``model`` on ``batch``.

    The call goes through the model's own ``forward`` (so DDP / FSDP / DeepSpeed wrappers and PEFT adapters see
    it) with ``output_hidden_states=True``; where the model accepts ``logits_to_keep`` only the last position's
    logits are computed, so the full ``(N, L, V)`` logits are never built.
    """
    input_ids, attention_mask, position_ids = model_inputs(batch)
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        output_hidden_states=True, return_dict=True, **kwargs,
    )
    return out.hidden_states[-1]


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    inner = model
    for attr in ("module", "base_model", "model"):  # DDP / PEFT wrappers
        if "logits_to_keep" in forward_params(inner):
            return True
        nxt = getattr(inner, attr, None)
        if not isinstance(nxt, nn.Module):
            break
        inner = nxt
    return "logits_to_keep" in forward_params(inner)


def forward_params(model: nn.Module) -> frozenset[str]:
    """The argument names of ``model.forward`` (empty when its signature cannot be read)."""
    import inspect

    try:
        return frozenset(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def predicting_states(hidden: torch.Tensor, batch: CompletionBatch) -> torch.Tensor:
    """States that predict each response token: ``hidden[:, P-1 : P-1+T]`` -> ``(N, T, H)``."""
    p = batch.prompt_input_ids.shape[1]
    t = batch.completion_input_ids.shape[1]
    if p == 0:
        raise ValueError("every row needs at least one prompt token (e.g. BOS) to predict the first response token")
    return hidden[:, p - 1 : p - 1 + t]


def reading_states(hidden: torch.Tensor, batch: CompletionBatch) -> torch.Tensor:
    """States after reading each response token: ``hidden[:, P : P+T]`` -> ``(N, T, H)``."""
    p = batch.prompt_input_ids.shape[1]
    return hidden[:, p : p + batch.completion_input_ids.shape[1]]


def lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """``(weight, bias, softcap)`` of a causal LM's output head (through a DDP wrapper's ``.module``), as
    :func:`finegrain.ops.chunked.completion_stats` takes them: ``bias`` None when the head has none,
    ``softcap`` the config's ``final_logit_softcapping`` (Gemma 2) or None."""
    unwrapped = getattr(model, "module", model)
    head = unwrapped.get_output_embeddings()
    cap = getattr(getattr(unwrapped, "config", None), "final_logit_softcapping", None)
    return head.weight, getattr(head, "bias", None), cap


def completion_token_logps(model: nn.Module, batch: CompletionBatch, chunk_size: int = 1024) -> torch.Tensor:
    """``(N, T)`` token log-probs of ``batch``'s responses under ``model``, 0 outside the completion mask; the
    head is applied in chunks (:func:`finegrain.ops.chunked.completion_stats`), so no ``(N, T, V)`` logits are
    built. The head is read after the forward: under FSDP2 the root module's parameters (the head's among them)
    are gathered only then."""
    from finegrain.ops.chunked import completion_stats

    h = predicting_states(hidden_states(model, batch), batch)
    weight, bias, cap = lm_head(model)
    return completion_stats(h, weight, batch.completion_input_ids, batch.completion_mask, policy_bias=bias,
                            compute_kl=False, chunk_size=chunk_size, logit_softcap=cap).token_logps


def output_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function ``hidden (..., H) -> logits (..., V)`` of a causal LM, as its own forward applies it.

    Applies the output embedding and, where the config asks for it, final-logit soft-capping (Gemma 2).
    """
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (LM head)")
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if not cap:
        return head

    def capped(h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(head(h) / cap) * cap

    return capped
