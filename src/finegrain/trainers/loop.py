"""Small shared pieces of every training loop: the accelerator, optimizer and schedule, the guarded optimizer step,
micro-batches. The run directory (config, metrics, checkpoints, resuming) is :mod:`finegrain.trainers.rundir`; its
public names are importable from here too.

Nothing here owns the loop itself; each trainer file reads top to bottom and calls these functions.
"""

from __future__ import annotations

import math
import os
import time

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

__all__ = ["CHECKPOINTS", "STATE_FILE", "Run", "RunState", "checkpoint_dirs", "checkpoint_problem", "make_accelerator",
           "make_optimizer", "make_scheduler", "micro_batches", "num_training_steps", "optimizer_step",
           "quiet_library_progress_bars"]


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


def num_training_steps(cfg: TrainConfig, num_examples: int, global_batch_size: int) -> int:
    """``max_steps`` if set, else epochs x (full global batches per epoch)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = num_examples // global_batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"the training data has {num_examples} rows, fewer than one global batch ({global_batch_size} = "
            "per_device_train_batch_size x processes x gradient_accumulation_steps); lower the batch size"
        )
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
    stats = _guarded_step(run, state, params, optimizer, scheduler, loss)
    pause = _env_seconds(STEP_SLEEP_ENV)
    if pause:  # fault-injection tests only: lets a test stop the run at a known step
        time.sleep(pause)
    return stats


def _guarded_step(run: Run, state: RunState, params, optimizer, scheduler, loss: torch.Tensor) -> dict[str, float]:
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
    return {"grad_norm": float(norm) if finite else float("nan"), "skipped": 0.0 if finite else 1.0,
            "nonfinite_total": float(state.nonfinite_total), "learning_rate": scheduler.get_last_lr()[0]}


def micro_batches(indices: list[int], cfg: TrainConfig, rank: int, num_processes: int) -> list[list[int]]:
    """Split one global batch of row indices into this process's micro-batches.

    The global batch is ``per_device_train_batch_size x num_processes x gradient_accumulation_steps`` rows;
    micro-step ``i`` covers rows ``[i*m, (i+1)*m)`` with ``m = per_device x num_processes``, and process ``r``
    takes the ``r``-th contiguous slice of it (:func:`finegrain.data.sampler.shard_batch`). Any process count and
    accumulation setting thus sees the same global batch.
    """
    from finegrain.data.sampler import shard_batch

    m = cfg.per_device_train_batch_size * num_processes
    return [shard_batch(indices[i * m : (i + 1) * m], num_processes, rank) for i in range(cfg.gradient_accumulation_steps)]
