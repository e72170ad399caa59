"""Model builders: tiny causal LMs from a transformers config, dtype names, dropout switches, LoRA wrapping."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain.errors import ConfigError


def torch_dtype(name: str, where: str = "") -> torch.dtype:
    """The torch dtype called ``name``: float32, bfloat16 or float16 (``where`` goes into the error)."""
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}{where}; choose float32, bfloat16 or float16") from None


def hidden_size(model: nn.Module) -> int:
    """The width ``H`` of a model's hidden states: its config's (the text config's, for a multimodal model)
    ``hidden_size``, ``n_embd`` or ``d_model``, else the width of its input embeddings."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    return int(model.get_input_embeddings().weight.shape[1])


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


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (a LoRA adapter on a base model)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def merged_lora_state_dict(peft_model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
                           ) -> dict[str, torch.Tensor]:
    """The base model's state dict with the active LoRA adapter merged in: ``W' = W + s · B A`` (Hu et al. 2021,
    "LoRA", eq. 3 and section 4.1), what peft's ``merge_and_unload`` computes, without changing or copying the model.

    ``s`` is the layer's scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023);
    layers that store ``W`` transposed (GPT-2's ``Conv1D``, ``fan_in_fan_out``) and embeddings get ``(B A)ᵀ``.
    ``modules_to_save`` copies replace their originals; a weight tied to a merged one (an output layer tied to an
    embedding with an adapter) is the merged weight, as in peft and as a tied model loads it. Keys lose peft's ``base_model.model.`` prefix, so the result
    loads into the plain model (``peft_model.get_base_model().save_pretrained(dir, state_dict=...)``). Working from a
    state dict, it serves a gathered one (``accelerator.get_state_dict`` under FSDP or ZeRO-3) as well as the
    model's own. The training loop's final model and :func:`finegrain.models.reward_model.save_reward_model` both
    merge with it.

    Args:
        peft_model: the (unwrapped) ``peft.PeftModel``; read for its adapter name, scalings and layouts.
        state_dict: its full state dict, on any device; None: ``peft_model.state_dict()``.

    Returns:
        ``{name: tensor}`` in the base model's own names, the dtypes of the base weights.
    """
    adapter = getattr(peft_model, "active_adapter", "default")
    adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
    if getattr(peft_model.peft_config[adapter], "use_dora", False):
        raise NotImplementedError("DoRA adapters are not merged here; use peft's merge_and_unload")
    state_dict = peft_model.state_dict() if state_dict is None else state_dict
    params = dict(peft_model.named_parameters(remove_duplicate=False))  # tied names hold one parameter
    merged: dict[Any, torch.Tensor] = {}  # a base weight's parameter -> the weight merged
    for key, value in state_dict.items():
        module_key = key[: -len(".base_layer.weight")]
        for a_key, b_key, embedding in ((f"{module_key}.lora_A.{adapter}.weight", f"{module_key}.lora_B.{adapter}.weight", False),
                                        (f"{module_key}.lora_embedding_A.{adapter}", f"{module_key}.lora_embedding_B.{adapter}", True)):
            if key.endswith(".base_layer.weight") and a_key in state_dict:
                module = peft_model.get_submodule(module_key)
                a = state_dict[a_key].float()
                delta = (state_dict[b_key].float().to(a.device) @ a) * float(module.scaling[adapter])
                if embedding or getattr(module, "fan_in_fan_out", False):
                    delta = delta.T
                merged[id(params.get(key, key))] = (value.float() + delta.to(value.device)).to(value.dtype)
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        if f".modules_to_save.{adapter}." in name:
            out[name.replace(f".modules_to_save.{adapter}.", ".")] = value
        elif ".modules_to_save." not in name:
            out.setdefault(name.replace(".base_layer.", "."), merged.get(id(params.get(key, key)), value))
    return out


def save_merged_lora(peft_model: nn.Module, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
                     ) -> None:
    """Save ``peft_model``'s base model with its adapter merged (:func:`merged_lora_state_dict`) in Hugging Face
    format (safetensors) in ``directory``: it loads with ``AutoModelForCausalLM.from_pretrained``.

    An output layer that no longer equals its tied input embedding (the embedding trained as a ``modules_to_save``
    copy) is saved untied (``tie_word_embeddings`` false), as peft's ``merge_and_unload`` leaves it; the model in
    memory is not changed.
    """
    base = peft_model.get_base_model()
    weights = merged_lora_state_dict(peft_model, state_dict)
    names = {module: name for name, module in base.named_modules()}
    out_key, in_key = (f"{names.get(m)}.weight" for m in (base.get_output_embeddings(), base.get_input_embeddings()))
    untie = (getattr(base.config, "tie_word_embeddings", False) and out_key in weights and in_key in weights
             and not torch.equal(weights[out_key], weights[in_key]))
    if untie:
        base.config.tie_word_embeddings = False
    try:
        base.save_pretrained(directory, state_dict=weights, safe_serialization=True)
    finally:
        if untie:
            base.config.tie_word_embeddings = True
