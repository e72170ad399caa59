"""Model builders: tiny causal LMs from a transformers config, dropout switches, LoRA wrapping."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      intermediate_size: int | None = None, max_position_embeddings: int = 128,
                      pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2):
    """A small Llama config (the world's base model and the tests' models)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=True,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        attention_dropout=0.0,
    )


def causal_lm_from_config(config, seed: int = 0) -> nn.Module:
    """A randomly initialised ``AutoModelForCausalLM`` with deterministic weights."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


_DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "summary_first_dropout", "classifier_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob")


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (modules and config), as preference-optimisation recipes do."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key in _DROPOUT_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)


def freeze(model: nn.Module) -> nn.Module:
    """Put a model in eval mode with no trainable parameters (a reference or frozen scorer)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: Iterable[str],
               task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None) -> nn.Module:
    """Wrap ``model`` with a LoRA adapter (peft). ``target_modules=['all-linear']`` targets every linear layer."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type=task_type, modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)
