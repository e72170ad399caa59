"""``finegrain sft``: supervised fine-tuning on prompt/completion rows (loss on completion tokens).

It trains the world's base policy (from scratch, on the world's corpus) and serves users' SFT on any causal LM and
data set in TRL's formats (``{prompt, completion}``, ``{messages}``, ``{text}``). The loop is explicit:

    for each optimizer step:
        for each micro-batch of this process (gradient accumulation):
            hidden states -> LM head in chunks -> log-probs of the completion tokens
            loss = -(sum of completion log-probs) / (completion tokens in the whole global batch)
        clip, check finiteness, step; log; evaluate; checkpoint

Normalising by the global batch's token count (known on every process, no communication) makes the update the same
for any number of processes and accumulation steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from finegrain.config import TrainConfig, check_ranges, option
from finegrain.models.forward import completion_token_logps
from finegrain.trainers import loop


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning (completion-only loss)."""

    chunk_size: int = option(1024, "completion positions per chunk of the LM-head projection (memory vs speed)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, positive=("chunk_size",))


def completion_nll_sum(model, batch, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over completion tokens of ``-log p(y_t | x, y_<t)`` and the number of tokens, for one batch."""
    return -completion_token_logps(model, batch, chunk_size).sum(), batch.completion_mask.sum()


@torch.no_grad()
def evaluate(model, data, cfg: SFTConfig, accelerator) -> dict[str, float]:
    """Mean completion-token NLL on ``data`` (all processes share the work)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for _, batch in loop.eval_batches(data, cfg.per_device_eval_batch_size, accelerator):
        nll, n = completion_nll_sum(model, batch, cfg.chunk_size)
        total += torch.stack([nll.double(), n.double()])
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "ppl": float(torch.exp(torch.tensor(min(loss, 50.0))))}


def train(cfg: SFTConfig, model, tokenizer, train_data, eval_data=None, *, method: str = "sft") -> Path:
    """Run SFT and return the run directory (``final/`` holds the model)."""
    acc = loop.make_accelerator(cfg)
    run = loop.Run(cfg, "sft", method, acc)
    t = loop.prepare(run, loop.adapt_model(cfg, model), len(train_data))
    num_processes = acc.num_processes

    def step(indices):
        global_tokens = sum(len(train_data[i]["completion_input_ids"]) for i in indices)
        loss_sum = torch.zeros((), device=acc.device)
        for mb in loop.micro_steps(run, t.model, indices):
            nll, _ = completion_nll_sum(t.model, train_data.collate(mb).to(acc.device), cfg.chunk_size)
            # DDP averages gradients over processes; multiplying by their number keeps the global sum
            acc.backward(nll * num_processes / global_tokens)
            loss_sum += nll.detach()
        loss = (acc.reduce(loss_sum, reduction="sum") if num_processes > 1 else loss_sum) / global_tokens
        return loss, {"loss": loss}

    evaluation = None if eval_data is None else lambda state: evaluate(t.model, eval_data, cfg, acc)
    return loop.fit(run, t, train_data, step, tokenizer=tokenizer, desc="sft", evaluate=evaluation)


def load_inputs(cfg: SFTConfig):
    """Model, tokenizer and data for ``cfg`` (``--model_name_or_path`` and ``--dataset_name``; the command line fills
    them with the built-in world's when no model is named)."""
    return loop.load_inputs(cfg, "sft needs --model_name_or_path and --dataset_name (the data to fine-tune "
                            "on); with neither, `finegrain sft` trains the built-in world's base model")
