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

import contextlib
import dataclasses
import time
from pathlib import Path

import torch

from finegrain.config import TrainConfig, option
from finegrain.errors import ConfigError
from finegrain.models.forward import hidden_states, predicting_states
from finegrain.trainers import loop


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning (completion-only loss)."""

    chunk_size: int = option(1024, "completion positions per chunk of the LM-head projection (memory vs speed)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be positive, got {self.chunk_size}")


def completion_nll_sum(model, batch, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over completion tokens of ``-log p(y_t | x, y_<t)`` and the number of tokens, for one batch."""
    from finegrain.ops.chunked import completion_stats

    unwrapped = getattr(model, "module", model)  # DDP
    head = unwrapped.get_output_embeddings()
    h = predicting_states(hidden_states(model, batch), batch)
    cap = getattr(getattr(unwrapped, "config", None), "final_logit_softcapping", None)
    stats = completion_stats(h, head.weight, batch.completion_input_ids, batch.completion_mask,
                             policy_bias=getattr(head, "bias", None), compute_kl=False, chunk_size=chunk_size,
                             logit_softcap=cap)
    return -stats.token_logps.sum(), batch.completion_mask.sum()


@torch.no_grad()
def evaluate(model, data, cfg: SFTConfig, accelerator) -> dict[str, float]:
    """Mean completion-token NLL on ``data`` (all processes share the work)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    rank, num_processes = accelerator.process_index, accelerator.num_processes
    indices = list(range(len(data)))[rank::num_processes]
    for lo in range(0, len(indices), cfg.per_device_eval_batch_size):
        batch = data.collate(indices[lo : lo + cfg.per_device_eval_batch_size]).to(accelerator.device)
        nll, n = completion_nll_sum(model, batch, cfg.chunk_size)
        total += torch.stack([nll.double(), n.double()])
    if num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "ppl": float(torch.exp(torch.tensor(min(loss, 50.0))))}


def train(cfg: SFTConfig, model, tokenizer, train_data, eval_data=None, *, method: str = "sft") -> Path:
    """Run SFT and return the run directory (``final/`` holds the model)."""
    acc = loop.make_accelerator(cfg)
    run = loop.Run(cfg, "sft", method, acc)
    if cfg.disable_dropout:
        from finegrain.models.build import disable_dropout

        disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.use_peft:
        from finegrain.models.build import apply_lora

        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    num_processes = acc.num_processes
    global_batch = cfg.per_device_train_batch_size * num_processes * cfg.gradient_accumulation_steps
    total_steps = loop.num_training_steps(cfg, len(train_data), global_batch)
    optimizer = loop.make_optimizer(cfg, model.parameters())
    scheduler = loop.make_scheduler(cfg, optimizer, total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    state = loop.RunState()
    if run.resume_from is not None:
        state = run.load_checkpoint(run.resume_from, model, optimizer, scheduler)
        run.print(f"resumed from {run.resume_from} at step {state.step}")

    from finegrain.data.sampler import batch_indices
    from finegrain.trainers.throughput import example_work, flops_model, lora_weights

    mf, lora = flops_model(model), lora_weights(model)
    model.train()
    bar = run.progress(total_steps, state.step, "sft")
    status = "completed"
    with run.catch_interrupts():
        while state.step < total_steps:
            epoch_batches = batch_indices(len(train_data), global_batch, cfg.seed, state.epoch)
            if state.batch_in_epoch >= len(epoch_batches):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                continue
            indices = epoch_batches[state.batch_in_epoch]
            started = time.perf_counter()
            run.record_batch(state, indices)  # --record_consumed: proves resumes repeat and skip nothing
            global_tokens = sum(len(train_data[i]["completion_input_ids"]) for i in indices)
            loss_sum = torch.zeros((), device=acc.device)
            for k, mb in enumerate(loop.micro_batches(indices, cfg, acc.process_index, num_processes)):
                batch = train_data.collate(mb).to(acc.device)
                sync = k == cfg.gradient_accumulation_steps - 1
                with acc.no_sync(model) if not sync else contextlib.nullcontext():
                    nll, _ = completion_nll_sum(model, batch, cfg.chunk_size)
                    # DDP averages gradients over processes; multiplying by their number keeps the global sum
                    acc.backward(nll * num_processes / global_tokens)
                loss_sum += nll.detach()
            loss = acc.reduce(loss_sum, reduction="sum") / global_tokens if num_processes > 1 else loss_sum / global_tokens
            stats = loop.optimizer_step(run, state, model, optimizer, scheduler, loss)
            run.throughput.add(time.perf_counter() - started, *example_work(mf, (train_data[i] for i in indices),
                                                                           lora=lora))
            state.step += 1
            state.batch_in_epoch += 1
            state.samples += len(indices)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{run.throughput.last_rate:.0f}")
            # a skipped (non-finite) step is always logged, so metrics.jsonl shows every one
            if state.step % cfg.logging_steps == 0 or state.step == total_steps or stats["skipped"]:
                run.log({"loss": loss, **stats, "epoch": state.epoch + state.batch_in_epoch / len(epoch_batches)}, state)
            if eval_data is not None and cfg.eval_steps and state.step % cfg.eval_steps == 0:
                run.log(evaluate(model, eval_data, cfg, acc), state, split="eval")
            if cfg.save_steps and state.step % cfg.save_steps == 0:
                run.save_checkpoint(state, model, optimizer, scheduler, tokenizer)
            if run.interrupted():
                run.save_checkpoint(state, model, optimizer, scheduler, tokenizer)
                status = "interrupted"
                break
    bar.close()
    if status == "completed":
        if eval_data is not None:
            run.log(evaluate(model, eval_data, cfg, acc), state, split="eval")
        run.save_final(model, tokenizer)
    run.close(status, steps=state.step, skipped_steps=state.nonfinite_total)  # prints the summary line
    if status == "interrupted":
        raise KeyboardInterrupt
    return run.dir


def load_inputs(cfg: SFTConfig):
    """Model, tokenizer and data for ``cfg`` (``--model_name_or_path`` and ``--dataset_name``; the command line fills
    them with the built-in world's when no model is named)."""
    from finegrain.data.prepared import CompletionData
    from finegrain.data.tokenize import TokenLimits
    from finegrain.models.loading import load_causal_lm, load_tokenizer

    if cfg.model_name_or_path is None or cfg.dataset_name is None:
        raise ConfigError("sft needs --model_name_or_path and --dataset_name (the data to fine-tune on); with neither, "
                          "`finegrain sft` trains the built-in world's base model")
    limits = TokenLimits(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                               trust_remote_code=cfg.trust_remote_code)
    train_data = CompletionData.from_source(cfg.dataset_name, tokenizer, split=cfg.dataset_split, kind=None,
                                            limits=limits, skip_invalid=cfg.skip_invalid_rows,
                                            max_examples=cfg.max_train_samples)
    eval_data = None
    if cfg.eval_dataset_name is not None:
        eval_data = CompletionData.from_source(cfg.eval_dataset_name, tokenizer, split=cfg.eval_split, limits=limits,
                                               skip_invalid=cfg.skip_invalid_rows, max_examples=cfg.max_eval_samples)
    # the model last: a bad row or split is reported in seconds, not after the model's loading time
    model = load_causal_lm(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer, train_data, eval_data
