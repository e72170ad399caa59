"""The shared pieces of every training loop: the accelerator, optimizer and schedule, the guarded optimizer
step, micro-batches, and the loop itself (:func:`run_steps`; sft, po and rm enter it through :func:`fit`, ppo,
which samples, scores and takes its own optimizer steps, directly: each supplies its step, its evaluation and
its final save). The run directory (config, metrics, checkpoints, resuming) is
:mod:`finegrain.trainers.rundir`; its public names are importable from here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from finegrain.config import TrainConfig
from finegrain.errors import ConfigError, NonFiniteError
from finegrain.trainers.rundir import (
    CHECKPOINTS,
    STATE_FILE,
    STEP_SLEEP_ENV,
    Run,
    RunState,
    _env_seconds,
    checkpoint_dirs,
    checkpoint_problem,
    quiet_library_progress_bars,
)

__all__ = ["CHECKPOINTS", "STATE_FILE", "Run", "RunState", "Training", "adapt_model", "checkpoint_dirs",
           "checkpoint_problem", "eval_batches", "fit", "load_inputs", "make_accelerator", "make_optimizer",
           "make_scheduler", "micro_steps", "num_training_steps", "optimizer_step",
           "prepare", "quiet_library_progress_bars", "run_steps", "token_limits"]


# ----------------------------------------------------------------------------------------------- accelerate


def make_accelerator(cfg: TrainConfig):
    """An ``accelerate.Accelerator`` for ``cfg`` (mixed precision, trackers); the loop accumulates gradients itself.

    Several processes launched on a machine without a GPU (``finegrain <command> --accelerate_config multi_gpu
    --num_processes 2`` or ``torchrun``) get accelerate's CPU backend (gloo): accelerate otherwise treats each of
    them as a lone single process.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = Accelerator(
        cpu=_cpu_only_multiprocess(),
        mixed_precision="bf16" if cfg.bf16 else "no",
        log_with=cfg.report_to or None,
        project_dir=cfg.output_dir or f"runs/{type(cfg).__name__}",
    )
    set_seed(cfg.seed)
    _configure_deepspeed(acc, cfg)
    return acc


def _configure_deepspeed(acc, cfg: TrainConfig) -> None:
    """Under DeepSpeed the engine clips and steps inside ``backward``: give it our clipping norm, and refuse
    gradient accumulation, whose loss scaling DeepSpeed would apply on top of the loop's own normalisation."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        return
    if cfg.gradient_accumulation_steps > 1:
        raise ConfigError(
            "--gradient_accumulation_steps > 1 is not supported with the DeepSpeed presets (DeepSpeed would scale the "
            "loss a second time); raise --per_device_train_batch_size or --num_processes, or use the fsdp2 preset"
        )
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.max_grad_norm


def _cpu_only_multiprocess() -> bool:
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (torch.cuda.is_available() or has_xpu)


def num_training_steps(cfg: TrainConfig, num_examples: int, global_batch_size: int, too_few: str = "") -> int:
    """``max_steps`` if set, else epochs x (full global batches per epoch); ``too_few``: the error when the
    data hold less than one global batch (default: sft's, po's and rm's)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = num_examples // global_batch_size
    if per_epoch == 0:
        raise ConfigError(too_few or (
            f"the training data has {num_examples} rows, fewer than one global batch ({global_batch_size} = "
            "per_device_train_batch_size x processes x gradient_accumulation_steps); lower the batch size"))
    return max(1, int(math.ceil(per_epoch * cfg.num_train_epochs)))


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optim == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))
    if cfg.optim == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.learning_rate)
    return torch.optim.SGD(groups, lr=cfg.learning_rate)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """transformers' schedule, built as TRL's trainers build it (``Trainer.create_scheduler``): ``get_scheduler``
    with ``W = warmup_steps`` (or ``ceil(warmup_ratio * total_steps)`` when it is 0) and ``T = total_steps``.

    The rate at optimizer step ``t`` (counted from 0) is ``lr * t / W`` while ``t < W``, then ``lr`` (constant),
    ``lr * (T - t) / (T - W)`` (linear) or ``lr * (1 + cos(pi * (t - W) / (T - W))) / 2`` (cosine): 0 at ``T``.
    ``constant`` is transformers' ``constant_with_warmup`` (its ``constant`` ignores warm-up). What changed from
    finegrain's earlier schedule: docs/run-directory.md, "Learning-rate schedule".
    """
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_scheduler_type]
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def optimizer_step(run: Run, state: RunState, model, optimizer, scheduler, loss: torch.Tensor) -> dict[str, float]:
    """Clip, check finiteness, step. A non-finite loss or gradient skips the step (counted); too many in a row stop.

    A skipped step leaves the weights, the optimizer's moments and the learning-rate schedule untouched and
    discards the step's gradients. After ``--max_nonfinite_steps`` consecutive skips a
    :class:`~finegrain.errors.NonFiniteError` says what to change. The check agrees across processes: the loss
    flag is reduced and the clipped norm is already global.

    Returns ``{"grad_norm", "skipped" (0/1), "nonfinite_total", "learning_rate"}``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    acc = run.accelerator
    if run.cfg.max_grad_norm > 0:
        norm = acc.clip_grad_norm_(params, run.cfg.max_grad_norm)
        if norm is None:  # DeepSpeed clips inside its engine and may not report the norm
            norm = torch.zeros(())
    else:
        norms = [p.grad.norm() for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    norm = torch.as_tensor(norm, dtype=torch.float32)
    loss_ok = torch.isfinite(loss.detach().float()).all().to(acc.device).float().reshape(1)
    if acc.num_processes > 1:
        loss_ok = acc.reduce(loss_ok, reduction="mean")
    finite = bool(torch.isfinite(norm)) and bool(loss_ok.item() == 1.0)
    if finite:
        optimizer.step()
        scheduler.step()
        state.nonfinite_streak = 0
    else:
        state.nonfinite_streak += 1
        state.nonfinite_total += 1
        run.print(f"step {state.step + 1}: non-finite loss or gradient, step skipped "
                  f"({state.nonfinite_streak} in a row, {state.nonfinite_total} in total)")
        if state.nonfinite_streak >= run.cfg.max_nonfinite_steps:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"{state.nonfinite_streak} consecutive steps had a non-finite loss or gradient (last at step "
                f"{state.step + 1}); lower --learning_rate, check the data for extreme values, or try without --bf16. "
                "The last good checkpoint is in " + str(run.dir / CHECKPOINTS)
            )
    optimizer.zero_grad(set_to_none=True)
    pause = _env_seconds(STEP_SLEEP_ENV)
    if pause:  # fault-injection tests only: lets a test stop the run at a known step
        time.sleep(pause)
    return {"grad_norm": float(norm) if finite else float("nan"), "skipped": 0.0 if finite else 1.0,
            "nonfinite_total": float(state.nonfinite_total), "learning_rate": scheduler.get_last_lr()[0]}


def eval_batches(data, batch_size: int, acc) -> Iterator[tuple[list[int], Any]]:
    """This process's share of ``data`` for an evaluation (rows ``rank, rank + processes, ...``) in batches of
    ``batch_size`` rows: ``(row indices, collated batch on the accelerator's device)``."""
    indices = list(range(len(data)))[acc.process_index :: acc.num_processes]
    for lo in range(0, len(indices), batch_size):
        chunk = indices[lo : lo + batch_size]
        yield chunk, data.collate(chunk).to(acc.device)


def micro_steps(run: Run, model, indices: list[int]) -> Iterator[list[int]]:
    """This process's micro-batches of the global batch ``indices``, each but the last yielded inside ``no_sync``:
    DDP all-reduces the accumulated gradients once, in the last backward.

    The global batch is ``per_device_train_batch_size x num_processes x gradient_accumulation_steps`` rows;
    micro-step ``i`` covers rows ``[i*m, (i+1)*m)`` with ``m = per_device x num_processes``, and process ``r``
    takes the ``r``-th contiguous slice of it (:func:`finegrain.data.sampler.shard_batch`). Any process count and
    accumulation setting thus sees the same global batch.
    """
    from finegrain.data.sampler import shard_batch

    acc, cfg = run.accelerator, run.cfg
    m = cfg.per_device_train_batch_size * acc.num_processes
    for k in range(cfg.gradient_accumulation_steps):
        with acc.no_sync(model) if k != cfg.gradient_accumulation_steps - 1 else contextlib.nullcontext():
            yield shard_batch(indices[k * m : (k + 1) * m], acc.num_processes, acc.process_index)


# ----------------------------------------------------------------------------------------------- the loop


def token_limits(cfg: TrainConfig):
    """The :class:`~finegrain.data.tokenize.TokenLimits` of ``--max_length`` and ``--max_prompt_length``."""
    from finegrain.data.tokenize import TokenLimits

    return TokenLimits(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)


def load_inputs(cfg: TrainConfig, missing: str, read: Callable[[Any, Any, str | None, int | None], Any] | None = None,
                kind: str | None = None):
    """``(model, tokenizer, training data, held-out data or None)`` of a causal-LM command (sft, po, ppo).

    The tokenizer is ``--tokenizer_name_or_path``'s, else the model's; ``read(source, tokenizer, split,
    max_examples)`` reads ``--dataset_name`` and ``--eval_dataset_name`` (default: a
    :class:`~finegrain.data.prepared.CompletionData` of ``kind`` rows within :func:`token_limits`, bad rows
    skipped with ``--skip_invalid_rows``); ``missing`` is the error when ``cfg`` names no model or no data set.
    """
    from finegrain.data.prepared import CompletionData
    from finegrain.models.loading import load_causal_lm, load_tokenizer

    if cfg.model_name_or_path is None or cfg.dataset_name is None:
        raise ConfigError(missing)
    if read is None:
        def read(source, tokenizer, split, max_examples):
            return CompletionData.from_source(source, tokenizer, split=split, kind=kind, limits=token_limits(cfg),
                                              skip_invalid=cfg.skip_invalid_rows, max_examples=max_examples)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                               trust_remote_code=cfg.trust_remote_code)
    train_data = read(cfg.dataset_name, tokenizer, cfg.dataset_split, cfg.max_train_samples)
    eval_data = None
    if cfg.eval_dataset_name is not None:
        eval_data = read(cfg.eval_dataset_name, tokenizer, cfg.eval_split, cfg.max_eval_samples)
    # the model last: a bad row or split is reported in seconds, not after the model's loading time
    model = load_causal_lm(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer, train_data, eval_data


def adapt_model(cfg: TrainConfig, model):
    """Dropout off (``--disable_dropout``), gradient checkpointing and a LoRA adapter (``--use_peft``) as
    ``cfg`` asks; returns the model to train (the peft model with LoRA)."""
    from finegrain.models.build import apply_lora, disable_dropout

    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.use_peft:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    return model


@dataclasses.dataclass
class Training:
    """A model with its optimizer and schedule, prepared by accelerate, and the sizes of the run
    (:func:`prepare`).

    Fields:
        global_batch: examples per optimizer step, ``per_device_train_batch_size x processes x
            gradient_accumulation_steps``; ppo: the prompts of a rollout batch.
        total_steps: optimizer steps of the run (:func:`num_training_steps`); ppo: rollout batches.
        extra_models: name -> further model saved in checkpoints and restored (ppo's critic).
        samples_per_step: what a step adds to ``RunState.samples``, also recorded in run.json (ppo: the
            responses of a rollout batch); 0: the rows of the global batch, not recorded.
    """

    model: Any
    optimizer: Any
    scheduler: Any
    global_batch: int
    total_steps: int
    extra_models: dict[str, Any] = dataclasses.field(default_factory=dict)
    samples_per_step: int = 0


def prepare(run: Run, model, num_examples: int) -> Training:
    """The global batch, the number of steps over ``num_examples`` examples, the optimizer and the schedule of
    ``model``; model and optimizer prepared by the run's accelerator."""
    cfg, acc = run.cfg, run.accelerator
    global_batch = cfg.per_device_train_batch_size * acc.num_processes * cfg.gradient_accumulation_steps
    total_steps = num_training_steps(cfg, num_examples, global_batch)
    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    return Training(model, optimizer, scheduler, global_batch, total_steps)


def fit(run: Run, t: Training, data, step: Callable[[list[int]], tuple[torch.Tensor, dict[str, Any]]], *,
        postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None, flops_of=None, lm_head: bool = True,
        reference: bool = False, **loop_args) -> Path:
    """The loop of sft, po and rm: :func:`run_steps` (``loop_args``: its keywords) over the rows of ``data``.

    ``step(indices) -> (loss, metrics)`` runs this process's micro-batches of a global batch
    (:func:`micro_steps`); then come the guarded optimizer step on ``loss`` and the throughput meter
    (:func:`~finegrain.trainers.throughput.example_work` of the rows with ``lm_head`` and ``reference``, FLOPs
    of ``flops_of``, default ``t.model``). A metrics line holds ``metrics``, the optimizer step's and ``epoch``;
    the progress bar shows the loss and ``postfix(metrics)``.
    """
    from finegrain.trainers.throughput import example_work, flops_model, lora_weights

    counted = t.model if flops_of is None else flops_of
    mf, lora = flops_model(counted), lora_weights(counted)
    per_epoch = len(data) // t.global_batch  # global batches per epoch (batch_indices drops a partial last one)
    t.model.train()

    def train_step(state: RunState, indices: list[int]) -> dict[str, Any]:
        started = time.perf_counter()
        loss, metrics = step(indices)
        stats = optimizer_step(run, state, t.model, t.optimizer, t.scheduler, loss)
        run.throughput.add(time.perf_counter() - started, *example_work(
            mf, (data[i] for i in indices), lm_head=lm_head, lora=lora, reference=reference))
        return {**metrics, **stats, "epoch": state.epoch + (state.batch_in_epoch + 1) / per_epoch}

    def shown(metrics: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{float(metrics['loss']):.3f}", **(postfix(metrics) if postfix else {})}

    return run_steps(run, t, len(data), train_step, postfix=shown, **loop_args)


def run_steps(run: Run, t: Training, num_rows: int, step: Callable[[RunState, list[int]], dict[str, Any]], *,
              tokenizer, desc: str, postfix: Callable[[dict[str, Any]], dict[str, str]],
              evaluate: Callable[[RunState], dict[str, float] | None] | None = None,
              save_final: Callable[[RunState], None] | None = None, summary: dict[str, Any] | None = None) -> Path:
    """The loop of every training command (sft, po and rm through :func:`fit`; ppo): resume (:meth:`Run.resume`
    of ``t``'s models, optimizer and scheduler), then ``step(state, indices) -> metrics`` on each global batch of
    ``num_rows`` rows (:func:`~finegrain.data.sampler.batch_indices`, a new permutation each epoch; ``state``
    still counts the steps before it) until ``t.total_steps``, then the last evaluation and the final save.
    Returns the run directory.

    After each step come the progress bar (``desc``; ``postfix(metrics)``, tokens/s) and a metrics line every
    ``logging_steps``, at the last step and at every skipped step (``metrics["skipped"]``). ``evaluate(state)``
    (metrics logged as ``split="eval"``; None logs nothing) runs every ``eval_steps`` and once more at the end
    of a completed run, unless its last step was just evaluated. Then ``run.interrupted()`` is asked once: a
    checkpoint is written when ``save_steps`` is due or an interrupt arrived (one save, never two at a step),
    and an interrupted run stops (``run.close``, then KeyboardInterrupt). A completed run ends with
    ``save_final(state)`` (default :meth:`Run.save_final` of the model and ``tokenizer``) and ``run.close``
    with the steps (the samples too when ``t.samples_per_step`` is set), the skipped steps and ``summary``.
    """
    from tqdm.auto import tqdm

    from finegrain.data.sampler import batch_indices

    cfg = run.cfg
    state = run.resume(t.model, t.optimizer, t.scheduler, extra_models=t.extra_models)
    bar = tqdm(total=t.total_steps, initial=state.step, desc=desc, dynamic_ncols=True,
               disable=cfg.disable_tqdm or not run.is_main)
    status = "completed"

    def evaluation_due() -> bool:
        return evaluate is not None and bool(cfg.eval_steps) and state.step % cfg.eval_steps == 0

    def log_evaluation() -> None:
        metrics = evaluate(state)
        if metrics is not None:
            run.log(metrics, state, split="eval")

    with run.catch_interrupts():
        while state.step < t.total_steps:
            epoch_batches = batch_indices(num_rows, t.global_batch, cfg.seed, state.epoch)
            if state.batch_in_epoch >= len(epoch_batches):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                continue
            indices = epoch_batches[state.batch_in_epoch]
            run.record_batch(state, indices)  # --record_consumed: proves resumes repeat and skip nothing
            metrics = step(state, indices)
            state.step += 1
            state.batch_in_epoch += 1
            state.samples += t.samples_per_step or len(indices)
            bar.update(1)
            bar.set_postfix(**postfix(metrics), tok_s=f"{run.throughput.last_rate:.0f}")
            # a skipped (non-finite) step is always logged, so metrics.jsonl shows every one
            if state.step % cfg.logging_steps == 0 or state.step == t.total_steps or metrics["skipped"]:
                run.log(metrics, state)
            if evaluation_due():
                log_evaluation()
            stop = run.interrupted()
            if (cfg.save_steps and state.step % cfg.save_steps == 0) or stop:
                run.save_checkpoint(state, t.model, t.optimizer, t.scheduler, tokenizer, extra_models=t.extra_models)
            if stop:
                status = "interrupted"
                break
    bar.close()
    if status == "completed":
        if evaluate is not None and not evaluation_due():
            log_evaluation()
        if save_final is None:
            run.save_final(t.model, tokenizer)
        else:
            save_final(state)
    samples = {"samples": state.samples} if t.samples_per_step else {}
    # prints the summary line
    run.close(status, steps=state.step, **samples, skipped_steps=state.nonfinite_total, **(summary or {}))
    if status == "interrupted":
        raise KeyboardInterrupt
    return run.dir
