"""The world's base policy: a tiny Llama trained by ``finegrain sft`` on the world's corpus, and sampling from it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from finegrain.world.config import WorldConfig


def base_model(cfg: WorldConfig, tokenizer):
    """A freshly initialised model of the world's base architecture (seeded with the world's seed)."""
    from finegrain.models.build import causal_lm_from_config, tiny_llama_config

    config = tiny_llama_config(
        len(tokenizer), hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return causal_lm_from_config(config, seed=cfg.seed)


def train_base_model(cfg: WorldConfig, corpus: list[dict], tokenizer, out_dir: Path, *, show_progress: bool = True):
    """SFT a fresh base model on ``corpus``; save it (with the tokenizer) to ``out_dir``. Returns (model, stats)."""
    from finegrain.data.prepared import CompletionData
    from finegrain.data.tokenize import TokenLimits
    from finegrain.models.loading import load_causal_lm
    from finegrain.trainers.sft import SFTConfig, train

    out_dir = Path(out_dir)
    run_dir = out_dir.parent / "sft_run"
    sft_cfg = SFTConfig(
        output_dir=str(run_dir), overwrite_output_dir=True, learning_rate=cfg.sft_learning_rate,
        lr_scheduler_type="cosine", warmup_ratio=0.05, per_device_train_batch_size=cfg.sft_batch_size,
        max_steps=cfg.sft_steps, max_length=128, max_prompt_length=80,  # a revision request holds a draft
        seed=cfg.seed, weight_decay=0.0,
        logging_steps=max(1, cfg.sft_steps // 20), save_steps=0, disable_tqdm=not show_progress,
    )
    limits = TokenLimits(max_length=sft_cfg.max_length, max_prompt_length=sft_cfg.max_prompt_length)
    data = CompletionData.from_source(corpus, tokenizer, kind="sft", limits=limits)
    model = base_model(cfg, tokenizer)
    run = train(sft_cfg, model, tokenizer, data, method="world-base")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(run / "final", out_dir)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    model = load_causal_lm(str(out_dir)).eval()
    return model, {"final_loss": losses[-1] if losses else float("nan"), "steps": cfg.sft_steps}


def sample_responses(model, tokenizer, prompts: list[str], *, num_samples: int, cfg: WorldConfig,
                     batch_size: int = 256, show_progress: bool = True) -> list[tuple[str, ...]]:
    """``num_samples`` sampled responses (decoded text) per prompt from ``model``
    (:func:`finegrain.rl.rollout.sample_prompts`), one generator seeded with ``cfg.seed`` for all batches."""
    from tqdm.auto import tqdm

    from finegrain.rl.rollout import sample_prompts

    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    out: list[tuple[str, ...]] = []
    for lo in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not show_progress):
        chunk = prompts[lo : lo + batch_size]
        texts = sample_prompts(model, tokenizer, chunk, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               num_samples=num_samples, generator=gen).responses
        out += [tuple(texts[i * num_samples : (i + 1) * num_samples]) for i in range(len(chunk))]
    return out
