"""The run directory of a training command: config, run.json, metrics, trackers, checkpoints and resuming.

Checkpoints (``RUN_DIR/checkpoints/step-000042/``) hold the trainable weights as safetensors, the optimizer and
scheduler state, every process's RNG states (``rng-<rank>.pt``) and the data position (:class:`RunState`). They
are written to a temporary directory and renamed into place, so a run killed while writing leaves the previous
checkpoint intact; a failed write (full disk, read-only directory) raises an error that says so and removes the
partial copy. Every process learns of a failed write, so none is left waiting for the others. Before anything in
the directory is written, the inputs are validated: a corrupt checkpoint, an existing run without
``--overwrite_output_dir`` are refused (docs/reliability.md).

Resuming truncates ``metrics.jsonl`` (and ``consumed.jsonl``, :meth:`Run.record_batch`) to the checkpoint's step,
so lines written after the checkpoint by the killed run are not repeated. The fault-injection switches
``FINEGRAIN_TEST_STEP_SLEEP`` and ``FINEGRAIN_TEST_CHECKPOINT_PAUSE`` are for tests only (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegrain import __version__
from finegrain.config import TrainConfig, dump_yaml
from finegrain.data.files import write_text
from finegrain.errors import ConfigError, FinegrainError
from finegrain.trainers.checkpoints import (
    CHECKPOINTS,
    STATE_FILE,
    WRITE_ERRORS,
    checkpoint_dirs,
    checkpoint_problem,
    describe_write_error,
    load_state_dict_into,
    replace_dir,
    rng_file,
    rng_state,
    set_rng_state,
    step_of,
    truncate_jsonl,
)

CONSUMED_FILE = "consumed.jsonl"
STEP_SLEEP_ENV = "FINEGRAIN_TEST_STEP_SLEEP"
CHECKPOINT_PAUSE_ENV = "FINEGRAIN_TEST_CHECKPOINT_PAUSE"


def quiet_library_progress_bars() -> None:
    """Silence transformers' and datasets' own progress bars ("Loading weights", "Writing model shards", map
    progress), so that ``--disable_tqdm`` means quiet."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _env_seconds(name: str) -> float:
    try:
        return max(0.0, float(os.environ.get(name, "0") or 0))
    except ValueError:
        return 0.0


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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------------------------- run directory


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
        _check_process_count(accelerator)
        # Everything is validated before anything in the run directory is written: a refused run leaves an
        # existing directory byte-for-byte as it was.
        self.resume_from = self._resolve_resume()
        self._check_existing_run()
        from finegrain.trainers.throughput import Throughput

        self.throughput = Throughput(accelerator.device, torch.bfloat16 if cfg.bf16 else torch.float32,
                                     devices=accelerator.num_processes)
        accelerator.wait_for_everyone()  # every process has looked before the main process writes
        if self.is_main:
            self._prepare_dir()
        accelerator.wait_for_everyone()
        self._metrics = (self.dir / "metrics.jsonl").open("a") if self.is_main else None
        record = cfg.record_consumed or os.environ.get("FINEGRAIN_RECORD_CONSUMED", "") in ("1", "true")
        self._consumed = (self.dir / CONSUMED_FILE).open("a") if self.is_main and record else None
        self._trackers = bool(cfg.report_to)
        if self._trackers:
            try:
                accelerator.init_trackers(f"finegrain-{command}-{method}", config=_plain(dataclasses.asdict(cfg)))
            except Exception as exc:  # tracker packages are optional: say so, keep metrics.jsonl
                self._trackers = False
                self.print(f"warning: trackers {cfg.report_to} unavailable ({exc}); metrics.jsonl is still written")
            active = {getattr(t, "name", "") for t in accelerator.trackers}
            missing = [t for t in cfg.report_to if t not in active]
            if missing and self.is_main:  # accelerate drops trackers whose package is missing without a word
                self.print(f"warning: trackers {', '.join(missing)} not available (pip install "
                           f"'finegrain[{','.join(missing)}]'); metrics.jsonl is still written")
        self._interrupted = False
        self._last: dict[str, dict[str, Any]] = {}
        self._started = time.monotonic()
        if cfg.disable_tqdm:
            quiet_library_progress_bars()
        self._announce()
        self._closed = False

    # -- set-up ------------------------------------------------------------------------------------------

    def _resolve_resume(self) -> Path | None:
        target = self.cfg.resume_from_checkpoint
        if not target:
            return None
        if target in ("latest", "true", "True"):
            found = checkpoint_dirs(self.dir)
            if not found:
                raise ConfigError(f"--resume_from_checkpoint latest: no checkpoint in {self.dir / CHECKPOINTS}")
            path = found[-1]
        else:
            path = Path(target)
            if not (path / STATE_FILE).is_file():
                raise ConfigError(f"--resume_from_checkpoint {target}: not a finegrain checkpoint (no {STATE_FILE})")
        problem = checkpoint_problem(path)
        if problem:
            older = [d for d in checkpoint_dirs(path.parent.parent) if step_of(d) < step_of(path)
                     and checkpoint_problem(d) is None]
            hint = (f"the older checkpoint {older[-1]} is complete: resume from it with --resume_from_checkpoint "
                    f"{older[-1]}" if older else "no older complete checkpoint exists; start afresh with "
                    "--overwrite_output_dir")
            raise ConfigError(f"cannot resume from {path}: {problem}; {hint}")
        return path

    def _check_existing_run(self) -> None:
        """Refuse to start a new run over one that exists, unless ``--overwrite_output_dir`` (or resuming it)."""
        if self.resume_from is not None or self.cfg.overwrite_output_dir:
            return
        existing = checkpoint_dirs(self.dir)
        if existing:
            raise ConfigError(
                f"{self.dir} already holds checkpoints of a run (latest {existing[-1].name}); pass "
                "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to start afresh, "
                "or choose another --output_dir"
            )
        found = [name for name in ("run.json", "final", "metrics.jsonl") if (self.dir / name).exists()]
        if found:
            try:
                status = json.loads((self.dir / "run.json").read_text()).get("status", "unknown")
            except (OSError, ValueError, AttributeError):
                status = "unknown"
            raise ConfigError(
                f"{self.dir} already holds a run (status {status}: {', '.join(found)}); pass --overwrite_output_dir "
                "to replace it, or choose another --output_dir"
            )

    def _prepare_dir(self) -> None:
        if self.resume_from is None and self.cfg.overwrite_output_dir:
            shutil.rmtree(self.dir / CHECKPOINTS, ignore_errors=True)
            for name in ("metrics.jsonl", CONSUMED_FILE, "final", "run.json"):
                p = self.dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        try:
            if self.resume_from is None:
                for name in ("metrics.jsonl", CONSUMED_FILE):
                    (self.dir / name).unlink(missing_ok=True)
            else:
                # lines written after the checkpoint by the stopped run would be repeated by this one
                step = RunState.from_json(json.loads((self.resume_from / STATE_FILE).read_text())).step
                for name in ("metrics.jsonl", CONSUMED_FILE):
                    truncate_jsonl(self.dir / name, step)
            # temporary copies left by a run killed while writing a checkpoint
            for tmp in (self.dir / CHECKPOINTS).glob(".tmp-*") if (self.dir / CHECKPOINTS).is_dir() else []:
                shutil.rmtree(tmp, ignore_errors=True)
            self.dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.cfg, self.dir / "config.yaml")
            self.write_status("running")
        except OSError as exc:
            raise FinegrainError(f"cannot write the run directory {self.dir}: {exc.strerror or exc}") from None

    def _announce(self) -> None:
        """Print what the run will do with options a user comparing with TRL or a plain loop may not expect: every
        option that differs from its default, and the schedule and clipping that apply (config.yaml has them all)."""
        from finegrain.config import non_defaults

        shown = {k: v for k, v in non_defaults(self.cfg).items() if k not in ("output_dir", "disable_tqdm")}
        cfg = self.cfg
        warmup = f"{cfg.warmup_steps} warm-up steps" if cfg.warmup_steps else (
            f"warm-up over {cfg.warmup_ratio:.0%} of the steps" if cfg.warmup_ratio else "no warm-up")
        decay = {"linear": "then linear decay to 0", "cosine": "then cosine decay to 0",
                 "constant": "then constant"}.get(cfg.lr_scheduler_type, cfg.lr_scheduler_type)
        clip = f"gradient norm clipped at {cfg.max_grad_norm:g}" if cfg.max_grad_norm else "no gradient clipping"
        self.print(f"finegrain {self.command} ({self.method}) in {self.dir}: "
                   + (", ".join(f"{k}={v}" for k, v in shown.items()) or "all options at their defaults"))
        self.print(f"  learning rate {cfg.learning_rate:g} with {warmup}, {decay}; {clip}; every option in "
                   f"{self.dir / 'config.yaml'}")

    def write_status(self, status: str, **extra: Any) -> None:
        """Update ``run.json`` (main process): command, method, status, start and finish times, and ``extra``."""
        if not self.is_main:
            return
        path = self.dir / "run.json"
        try:
            info = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            info = {}
        info.update(command=self.command, method=self.method, status=status, finegrain_version=__version__)
        info.setdefault("started", _now())
        info["finished"] = _now() if status != "running" else None
        info.update(extra)
        write_text(path, json.dumps(info, indent=2))

    # -- logging -----------------------------------------------------------------------------------------

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, file=sys.stderr, flush=True)

    def log(self, metrics: dict[str, float], state: RunState, split: str = "train") -> None:
        """Append one line to metrics.jsonl (main process) and forward to trackers; a training line also gets the
        throughput since the previous one (:mod:`finegrain.trainers.throughput`)."""
        if split == "train":
            metrics = {**metrics, **self.throughput.report()}
        clean = {k: _scalar(v) for k, v in metrics.items()}
        self._last[split] = clean
        if self._metrics is not None:
            self._metrics.write(json.dumps({"step": state.step, "samples": state.samples, "split": split, **clean}) + "\n")
            self._metrics.flush()
        if self._trackers:
            self.accelerator.log({f"{split}/{k}": v for k, v in clean.items()}, step=state.step)

    def record_batch(self, state: RunState, indices: list[int]) -> None:
        """Append the example indices of the global batch of step ``state.step + 1`` to ``consumed.jsonl``.

        Only with ``--record_consumed`` (or ``FINEGRAIN_RECORD_CONSUMED=1``); a no-op otherwise. Call it once per
        optimizer step, before the step, with the whole global batch (the same list on every process).
        """
        if self._consumed is not None:
            self._consumed.write(json.dumps({"step": state.step + 1, "epoch": state.epoch,
                                             "indices": [int(i) for i in indices]}) + "\n")
            self._consumed.flush()

    # -- interruption ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def catch_interrupts(self) -> Iterator[None]:
        """Turn Ctrl-C (SIGINT) and SIGTERM into a flag checked at the end of each step.

        An exception that escapes the block (other than the second Ctrl-C, which means "stop now") marks the run
        ``failed`` in run.json, with the error's message, before it propagates.
        """

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
        except KeyboardInterrupt:
            self._safe_close("interrupted")
            raise
        except Exception as exc:
            self._safe_close("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def _safe_close(self, status: str, **extra: Any) -> None:
        with contextlib.suppress(Exception):  # the original error matters more than a second one here
            self.close(status, **extra)

    def interrupted(self) -> bool:
        """Whether any process was interrupted (agreed across processes)."""
        return _any_process(self.accelerator, self._interrupted)

    # -- checkpoints -------------------------------------------------------------------------------------

    def save_checkpoint(self, state: RunState, model, optimizer, scheduler, tokenizer=None,
                        extra_models: dict[str, Any] | None = None) -> Path | None:
        """Write a resumable checkpoint atomically and prune old ones. Returns its path (main process).

        Layout: ``model/`` (and one folder per extra model) in Hugging Face format (safetensors; a LoRA run
        stores its adapter), ``optim.pt`` (optimizer + scheduler), ``rng.pt``, ``trainer_state.json``. The copy is
        written to ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` only when complete.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.dir / CHECKPOINTS / f"step-{state.step:06d}"
        models = {"model": model, **(extra_models or {})}
        state_dicts = {name: acc.get_state_dict(m) for name, m in models.items()}
        tmp = self.dir / CHECKPOINTS / f".tmp-{final.name}"
        error = ""
        if self.is_main:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except WRITE_ERRORS as exc:
                error = describe_write_error(exc)
        if not _any_process(acc, bool(error)):  # a collective: every process takes part
            try:  # every process saves its own random state (dropout, sampling): resuming restores each exactly
                torch.save(rng_state(), tmp / f"rng-{acc.process_index}.pt")
            except WRITE_ERRORS as exc:
                error = describe_write_error(exc)
        rng_failed = _any_process(acc, bool(error))  # every process, before the main process goes on alone
        if self.is_main and rng_failed:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.is_main and not rng_failed:
            try:
                for name, m in models.items():
                    acc.unwrap_model(m).save_pretrained(tmp / name, state_dict=state_dicts[name], safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp / "model")
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
                write_text(tmp / STATE_FILE, json.dumps(dataclasses.asdict(state), indent=2))
                pause = _env_seconds(CHECKPOINT_PAUSE_ENV)
                if pause:
                    time.sleep(pause)
                replace_dir(tmp, final)
            except WRITE_ERRORS as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                error = describe_write_error(exc)
            if not error:
                limit = self.cfg.save_total_limit
                for old in checkpoint_dirs(self.dir)[:-limit] if limit > 0 else []:
                    shutil.rmtree(old, ignore_errors=True)
        if _any_process(acc, bool(error)):
            previous = checkpoint_dirs(self.dir) if self.is_main else []
            keep = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
            raise FinegrainError(
                f"could not write checkpoint {final}: {error or 'the main process failed to write it'}{keep}. Free "
                "disk space or fix the output directory's permissions, then resume with --resume_from_checkpoint latest"
            )
        return final if self.is_main else None

    def resume(self, model, optimizer, scheduler, extra_models: dict[str, Any] | None = None) -> RunState:
        """Restore weights, optimizer, scheduler, RNG and the data position from the checkpoint to resume
        (``--resume_from_checkpoint``) and say so; a fresh :class:`RunState` when there is none."""
        from safetensors.torch import load_file

        path = self.resume_from
        if path is None:
            return RunState()
        for name, m in {"model": model, **(extra_models or {})}.items():
            target = self.accelerator.unwrap_model(m)
            files = sorted((path / name).glob("*.safetensors"))
            if not files:
                raise ConfigError(f"checkpoint {path} has no weights for '{name}'")
            load_state_dict_into(target, {k: v for f in files for k, v in load_file(f).items()}, path / name)
        blob = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(torch.load(rng_file(path, self.accelerator.process_index), map_location="cpu", weights_only=True))
        state = RunState.from_json(json.loads((path / STATE_FILE).read_text()))
        self.print(f"resumed from {path} at step {state.step}")
        return state

    def save_final(self, model, tokenizer=None) -> Path:
        """Save the trained model in Hugging Face format (safetensors) under ``RUN_DIR/final``.

        A LoRA (peft) model is saved twice: merged into its base weights in ``final/`` (loads with
        ``AutoModelForCausalLM.from_pretrained``) and as the adapter alone in ``final/adapter/`` (loads with
        ``peft.PeftModel.from_pretrained`` on top of the base model). The merge is computed from the gathered state
        dict, so it works the same under FSDP or ZeRO-3, and it leaves the training model untouched.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(model)
        out = self.dir / "final"
        error = ""
        if self.is_main:
            from finegrain.models.build import is_peft_model, save_merged_lora

            tmp = self.dir / f".tmp-final-{os.getpid()}"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                unwrapped = acc.unwrap_model(model)
                if is_peft_model(unwrapped):
                    unwrapped.save_pretrained(tmp / "adapter", state_dict=state_dict, safe_serialization=True)
                    save_merged_lora(unwrapped, tmp, state_dict)
                else:
                    unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                replace_dir(tmp, out)
            except WRITE_ERRORS as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                error = describe_write_error(exc)
        if _any_process(acc, bool(error)):
            raise FinegrainError(f"could not write the final model to {out}: {error or 'the main process failed'}. "
                                 "Free disk space or fix permissions; the last checkpoint is in " + str(self.dir / CHECKPOINTS))
        return out

    def _summary_line(self, status: str, extra: dict[str, Any]) -> str:
        """``finegrain sft (sft) completed | 30 steps | train loss 1.2 | eval loss 1.3, ppl 3.7 | 12.0 s | run directory ...``"""
        parts = [f"finegrain {self.command} ({self.method}) {status}"]
        if "steps" in extra:
            parts.append(f"{extra['steps']} steps")
        for split in ("train", "eval"):
            last = self._last.get(split, {})
            shown = [f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float) and k in _SUMMARY_KEYS]
            if shown:
                parts.append(f"{split} " + ", ".join(shown))
        if extra.get("skipped_steps"):
            parts.append(f"{extra['skipped_steps']} skipped (non-finite)")
        totals = self.throughput.totals()
        for key, label in (("perf/tokens_per_second", "tokens/s"), ("perf/update_tokens_per_second", "update tokens/s"),
                           ("perf/rollout_tokens_per_second", "rollout tokens/s")):
            if key in totals:
                mfu = totals[key.replace("tokens_per_second", "mfu")]
                parts.append(f"{totals[key]:.0f} {label}, MFU {100 * mfu:.1f}%")
        parts.append(f"{time.monotonic() - self._started:.1f} s")
        parts.append(f"run directory {self.dir}")
        return " | ".join(parts)

    def close(self, status: str, **extra: Any) -> None:
        """Write the final status (and ``extra``, plus a ``summary`` of the last metrics) to run.json, close the
        metrics files and trackers, and print one summary line."""
        if self._closed:
            return
        self._closed = True
        line = self._summary_line(status, extra)
        perf = self.throughput.totals()
        if perf:
            extra = {**extra, "perf": perf, "perf_peak": {"flops": self.throughput.peak[0],
                                                          "source": self.throughput.peak[1]}}
        self.write_status(status, **extra, summary={s: m for s, m in self._last.items()})
        for f in (self._metrics, self._consumed):
            if f is not None:
                f.close()
        self._metrics = self._consumed = None
        if self._trackers:
            self.accelerator.end_training()
        self.print(line)


_SUMMARY_KEYS = ("loss", "ppl", "accuracy", "rewards/accuracies", "rewards/margins", "reward", "rewards/raw", "kl",
                 "win_rate", "auroc")

def _any_process(acc, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (every process gets the same answer)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def _check_process_count(acc) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and acc.num_processes != launched:
        raise ConfigError(
            f"{launched} processes were launched but the accelerator sees {acc.num_processes}; every process would "
            "train alone and write the same files. On a machine without GPUs launch with "
            "`finegrain <command> --accelerate_config multi_gpu --num_processes N` (which selects the CPU backend) "
            "or set ACCELERATE_USE_CPU=1"
        )


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().mean().item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # metrics.jsonl stays strict JSON: a skipped step's NaN norm is logged as null
    return v


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in d.items()}


