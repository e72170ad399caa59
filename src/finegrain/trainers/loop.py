"""Small shared pieces of every training loop: run directory, checkpoints, logging, optimisation, guards.

Nothing here owns the loop itself; each trainer file reads top to bottom and calls these functions.

Checkpoints (``RUN_DIR/checkpoints/step-000042/``) hold the trainable weights as safetensors, the optimizer and
scheduler state, the RNG states and the data position (:class:`RunState`). They are written to a temporary
directory and renamed into place, so a run killed while writing leaves the previous checkpoint intact; a failed
write (full disk, read-only directory) raises an error that says so and removes the partial copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import random
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegrain import __version__
from finegrain.config import TrainConfig, dump_yaml
from finegrain.errors import ConfigError, FinegrainError, NonFiniteError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------------------------- run state


@dataclasses.dataclass
class RunState:
    """Counters and the data position; saved in every checkpoint.

    ``epoch`` and ``batch_in_epoch`` say which global batch comes next: resuming continues there, so no example
    is repeated or skipped.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    nonfinite_streak: int = 0
    nonfinite_total: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------------------------- run directory


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / STATE_FILE).is_file()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


class Run:
    """The run directory of one training command: config, run.json, metrics.jsonl, trackers, checkpoints.

    Args:
        cfg: the command's resolved config.
        command: ``sft``, ``po``, ``rm`` or ``ppo``.
        method: the method name (e.g. ``tdpo2``), shown in reports.
        accelerator: the ``accelerate.Accelerator`` of the run.
    """

    def __init__(self, cfg: TrainConfig, command: str, method: str, accelerator):
        self.cfg, self.command, self.method, self.accelerator = cfg, command, method, accelerator
        self.dir = Path(cfg.output_dir or f"runs/{command}-{method}")
        self.is_main = accelerator.is_main_process
        self.resume_from = self._resolve_resume()
        if self.is_main:
            self._prepare_dir()
        accelerator.wait_for_everyone()
        self._metrics = (self.dir / "metrics.jsonl").open("a") if self.is_main else None
        self._trackers = bool(cfg.report_to)
        if self._trackers:
            try:
                accelerator.init_trackers(f"finegrain-{command}-{method}", config=_plain(dataclasses.asdict(cfg)))
            except Exception as exc:  # tracker packages are optional: say so, keep metrics.jsonl
                self._trackers = False
                self.print(f"warning: trackers {cfg.report_to} unavailable ({exc}); metrics.jsonl is still written")
        self._interrupted = False
        self._old_sigint = None

    # -- set-up ------------------------------------------------------------------------------------------

    def _resolve_resume(self) -> Path | None:
        target = self.cfg.resume_from_checkpoint
        if not target:
            return None
        if target in ("latest", "true", "True"):
            found = checkpoint_dirs(self.dir)
            if not found:
                raise ConfigError(f"--resume_from_checkpoint latest: no checkpoint in {self.dir / CHECKPOINTS}")
            return found[-1]
        path = Path(target)
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"--resume_from_checkpoint {target}: not a finegrain checkpoint (no {STATE_FILE})")
        return path

    def _prepare_dir(self) -> None:
        existing = checkpoint_dirs(self.dir)
        if existing and self.resume_from is None:
            if not self.cfg.overwrite_output_dir:
                raise ConfigError(
                    f"{self.dir} already holds checkpoints of a run (latest {existing[-1].name}); pass "
                    "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to start afresh, "
                    "or choose another --output_dir"
                )
            shutil.rmtree(self.dir / CHECKPOINTS)
            for name in ("metrics.jsonl", "final"):
                p = self.dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        if self.resume_from is None and (self.dir / "metrics.jsonl").exists():
            (self.dir / "metrics.jsonl").unlink()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.cfg, self.dir / "config.yaml")
        except OSError as exc:
            raise FinegrainError(f"cannot write the run directory {self.dir}: {exc.strerror or exc}") from None
        self.write_status("running")

    def write_status(self, status: str, **extra: Any) -> None:
        if not self.is_main:
            return
        path = self.dir / "run.json"
        info = json.loads(path.read_text()) if path.exists() else {}
        info.update(command=self.command, method=self.method, status=status, finegrain_version=__version__)
        info.setdefault("started", _now())
        info["finished"] = _now() if status != "running" else None
        info.update(extra)
        _atomic_write_text(path, json.dumps(info, indent=2))

    # -- logging -----------------------------------------------------------------------------------------

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, file=sys.stderr, flush=True)

    def log(self, metrics: dict[str, float], state: RunState, split: str = "train") -> None:
        """Append one line to metrics.jsonl (main process) and forward to trackers."""
        clean = {k: _scalar(v) for k, v in metrics.items()}
        if self._metrics is not None:
            self._metrics.write(json.dumps({"step": state.step, "samples": state.samples, "split": split, **clean}) + "\n")
            self._metrics.flush()
        if self._trackers:
            self.accelerator.log({f"{split}/{k}": v for k, v in clean.items()}, step=state.step)

    def progress(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                    disable=self.cfg.disable_tqdm or not self.is_main)

    # -- interruption ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def catch_interrupts(self) -> Iterator[None]:
        """Turn Ctrl-C (SIGINT) and SIGTERM into a flag checked at the end of each step."""

        def handler(signum, frame):  # noqa: ARG001
            if self._interrupted:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self._interrupted = True
            self.print("\ninterrupt received: finishing this step, writing a checkpoint, then stopping")

        old = {}
        with contextlib.suppress(ValueError):  # not in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def interrupted(self) -> bool:
        """Whether any process was interrupted (agreed across processes)."""
        flag = torch.tensor([1.0 if self._interrupted else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    # -- checkpoints -------------------------------------------------------------------------------------

    def save_checkpoint(self, state: RunState, model, optimizer, scheduler, tokenizer=None,
                        extra_models: dict[str, Any] | None = None) -> Path | None:
        """Write a resumable checkpoint atomically and prune old ones. Returns its path (main process)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.dir / CHECKPOINTS / f"step-{state.step:06d}"
        models = {"model": model, **(extra_models or {})}
        state_dicts = {name: acc.get_state_dict(m) for name, m in models.items()}
        path = None
        if self.is_main:
            tmp = self.dir / CHECKPOINTS / f".tmp-{final.name}-{os.getpid()}"
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                for name, m in models.items():
                    acc.unwrap_model(m).save_pretrained(tmp / name, state_dict=state_dicts[name], safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp / "model")
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
                torch.save(_rng_state(), tmp / "rng.pt")
                _atomic_write_text(tmp / STATE_FILE, json.dumps(state.to_json(), indent=2))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                previous = checkpoint_dirs(self.dir)
                keep = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
                raise FinegrainError(
                    f"could not write checkpoint {final}: {exc.strerror or exc}{keep}. Free disk space or fix the "
                    "directory's permissions, then resume with --resume_from_checkpoint latest"
                ) from None
            for old in checkpoint_dirs(self.dir)[: -self.cfg.save_total_limit] if self.cfg.save_total_limit > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            path = final
        acc.wait_for_everyone()
        return path

    def load_checkpoint(self, path: Path, model, optimizer, scheduler, extra_models: dict[str, Any] | None = None) -> RunState:
        """Restore weights, optimizer, scheduler, RNG and the data position from ``path``."""
        from safetensors.torch import load_file

        for name, m in {"model": model, **(extra_models or {})}.items():
            target = self.accelerator.unwrap_model(m)
            files = sorted((path / name).glob("*.safetensors"))
            if not files:
                raise ConfigError(f"checkpoint {path} has no weights for '{name}'")
            weights: dict[str, torch.Tensor] = {}
            for f in files:
                weights.update(load_file(f))
            _load_state_dict(target, weights, path / name)
        blob = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        _set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
        return RunState.from_json(json.loads((path / STATE_FILE).read_text()))

    def save_final(self, model, tokenizer=None, name: str = "final") -> Path:
        """Save the trained model in Hugging Face format (safetensors) under ``RUN_DIR/final``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(model)
        out = self.dir / name
        if self.is_main:
            tmp = self.dir / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            acc.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        acc.wait_for_everyone()
        return out

    def close(self, status: str, **extra: Any) -> None:
        self.write_status(status, **extra)
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._trackers:
            self.accelerator.end_training()


def _load_state_dict(model, weights: dict[str, torch.Tensor], where: Path) -> None:
    own = model.state_dict()
    # tied weights are stored once by save_pretrained
    missing = [k for k in own if k not in weights and not _is_tied(model, k)]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(weights, strict=False)


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or getattr(model, "all_tied_weights_keys", None) or {}
    return key in tied or key.endswith("lm_head.weight")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().mean().item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return v


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in d.items()}


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npv = state["numpy"]
    np.random.set_state((npv[0], npv[1].numpy().astype(np.uint32), int(npv[2]), int(npv[3]), npv[4]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- accelerate


def make_accelerator(cfg: TrainConfig):
    """An ``accelerate.Accelerator`` for ``cfg`` (mixed precision, trackers); the loop accumulates gradients itself."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = Accelerator(
        mixed_precision="bf16" if cfg.bf16 else "no",
        log_with=cfg.report_to or None,
        project_dir=cfg.output_dir,
    )
    set_seed(cfg.seed)
    return acc


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
    """Linear warm-up, then constant / linear decay / cosine decay to 0 at ``total_steps``."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    kind = cfg.lr_scheduler_type

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(run: Run, state: RunState, model, optimizer, scheduler, loss: torch.Tensor) -> dict[str, float]:
    """Clip, check finiteness, step. A non-finite loss or gradient skips the step (counted); too many in a row stop.

    Returns ``{"grad_norm": ..., "skipped": 0/1}``.
    """
    acc = run.accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    if run.cfg.max_grad_norm > 0:
        norm = acc.clip_grad_norm_(params, run.cfg.max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
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
            "learning_rate": scheduler.get_last_lr()[0]}


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
