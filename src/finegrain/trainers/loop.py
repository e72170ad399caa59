"""Small shared pieces of every training loop: run directory, checkpoints, logging, optimisation, guards.

Nothing here owns the loop itself; each trainer file reads top to bottom and calls these functions.

Checkpoints (``RUN_DIR/checkpoints/step-000042/``) hold the trainable weights as safetensors, the optimizer and
scheduler state, the RNG states and the data position (:class:`RunState`). They are written to a temporary
directory and renamed into place, so a run killed while writing leaves the previous checkpoint intact; a failed
write (full disk, read-only directory) raises an error that says so and removes the partial copy. Every process
learns of a failed write, so none is left waiting for the others.

Resuming truncates ``metrics.jsonl`` (and ``consumed.jsonl``) to the checkpoint's step, so lines written after the
checkpoint by the killed run are not repeated. With ``--record_consumed`` each optimizer step's global batch of
example indices is appended to ``consumed.jsonl`` (:meth:`Run.record_batch`): the resume tests read it to show that
no example was repeated or skipped.

Two environment variables exist for fault-injection tests only (documented in docs/reliability.md):
``FINEGRAIN_TEST_STEP_SLEEP`` (seconds to sleep after each optimizer step, so a test can kill a run at a known
point) and ``FINEGRAIN_TEST_CHECKPOINT_PAUSE`` (seconds to sleep between writing a checkpoint's temporary
directory and renaming it into place, so a test can kill a run in the middle of a write).
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
import time
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
CONSUMED_FILE = "consumed.jsonl"
STEP_SLEEP_ENV = "FINEGRAIN_TEST_STEP_SLEEP"
CHECKPOINT_PAUSE_ENV = "FINEGRAIN_TEST_CHECKPOINT_PAUSE"


def quiet_library_progress_bars() -> None:
    """Silence transformers' and datasets' own progress bars ("Loading weights", "Writing model shards", map
    progress), so that ``--disable_tqdm`` means quiet."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------------------------- run directory


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _step_of(checkpoint: Path) -> int:
    try:
        return int(checkpoint.name.split("-")[1])
    except (IndexError, ValueError):
        return -1


def checkpoint_problem(path: str | Path) -> str | None:
    """What makes checkpoint ``path`` unusable (naming the file), or None when every file of it reads.

    Checked without loading the tensors: ``trainer_state.json`` parses, ``optim.pt`` and ``rng.pt`` are complete
    zip archives (what ``torch.save`` writes), every ``*.safetensors`` file's header covers the whole file (a
    truncated one fails here), and the policy's folder ``model/`` has weights.
    """
    import zipfile

    from safetensors import safe_open

    path = Path(path)
    state = path / STATE_FILE
    try:
        RunState.from_json(json.loads(state.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        return f"{state} is unreadable ({exc})"
    for name in ("optim.pt", "rng.pt"):
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if not zipfile.is_zipfile(f):
            return f"{f} is truncated or corrupt"
    if not any((path / "model").glob("*.safetensors")):
        return f"{path / 'model'} has no weights (*.safetensors)"
    for f in sorted(path.glob("*/*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError: the message says which
            return f"{f} is truncated or corrupt ({exc})"
    return None


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
        _check_process_count(accelerator)
        # Everything is validated before anything in the run directory is written: a refused run leaves an
        # existing directory byte-for-byte as it was.
        self.resume_from = self._resolve_resume()
        self._check_existing_run()
        if self.is_main:
            self._prepare_dir()
        accelerator.wait_for_everyone()
        self._metrics = (self.dir / "metrics.jsonl").open("a") if self.is_main else None
        self._consumed = (self.dir / CONSUMED_FILE).open("a") if self.is_main and _record_consumed(cfg) else None
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
        self._old_sigint = None
        self._last_saved_step: int | None = None
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
            older = [d for d in checkpoint_dirs(path.parent.parent) if _step_of(d) < _step_of(path)
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
                    if (self.dir / name).exists():
                        (self.dir / name).unlink()
            else:
                # lines written after the checkpoint by the stopped run would be repeated by this one
                step = RunState.from_json(json.loads((self.resume_from / STATE_FILE).read_text())).step
                for name in ("metrics.jsonl", CONSUMED_FILE):
                    _truncate_jsonl(self.dir / name, step)
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
        _atomic_write_text(path, json.dumps(info, indent=2))

    # -- logging -----------------------------------------------------------------------------------------

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, file=sys.stderr, flush=True)

    def log(self, metrics: dict[str, float], state: RunState, split: str = "train") -> None:
        """Append one line to metrics.jsonl (main process) and forward to trackers."""
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

    def progress(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                    disable=self.cfg.disable_tqdm or not self.is_main)

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
        if self._closed:
            return
        with contextlib.suppress(Exception):  # the original error matters more than a second one here
            self.close(status, **extra)

    def interrupted(self) -> bool:
        """Whether any process was interrupted (agreed across processes)."""
        flag = torch.tensor([1.0 if self._interrupted else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    # -- checkpoints -------------------------------------------------------------------------------------

    def save_checkpoint(self, state: RunState, model, optimizer, scheduler, tokenizer=None,
                        extra_models: dict[str, Any] | None = None) -> Path | None:
        """Write a resumable checkpoint atomically and prune old ones. Returns its path (main process).

        Layout: ``model/`` (and one folder per extra model) in Hugging Face format (safetensors; a LoRA run
        stores its adapter), ``optim.pt`` (optimizer + scheduler), ``rng.pt``, ``trainer_state.json``. The copy is
        written to ``checkpoints/.tmp-step-N-PID`` and renamed to ``checkpoints/step-N`` only when complete. A
        second call for the same step (an interrupt right after a scheduled save) returns the existing one.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.dir / CHECKPOINTS / f"step-{state.step:06d}"
        if self._last_saved_step == state.step:
            return final if self.is_main else None
        models = {"model": model, **(extra_models or {})}
        state_dicts = {name: acc.get_state_dict(m) for name, m in models.items()}
        error = ""
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
                pause = _env_seconds(CHECKPOINT_PAUSE_ENV)
                if pause:
                    time.sleep(pause)
                _replace_dir(tmp, final)
            except _WRITE_ERRORS as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                error = _describe_write_error(exc)
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
        self._last_saved_step = state.step
        return final if self.is_main else None

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
        state = RunState.from_json(json.loads((path / STATE_FILE).read_text()))
        self._last_saved_step = state.step
        return state

    def save_final(self, model, tokenizer=None, name: str = "final") -> Path:
        """Save the trained model in Hugging Face format (safetensors) under ``RUN_DIR/final``.

        A LoRA (peft) model is saved twice: merged into its base weights in ``final/`` (loads with
        ``AutoModelForCausalLM.from_pretrained``) and as the adapter alone in ``final/adapter/`` (loads with
        ``peft.PeftModel.from_pretrained`` on top of the base model). The merge is computed from the gathered state
        dict, so it works the same under FSDP or ZeRO-3, and it leaves the training model untouched.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(model)
        out = self.dir / name
        error = ""
        if self.is_main:
            tmp = self.dir / f".tmp-{name}-{os.getpid()}"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                unwrapped = acc.unwrap_model(model)
                if _is_peft(unwrapped):
                    from finegrain.models.build import save_merged_lora

                    unwrapped.save_pretrained(tmp / "adapter", state_dict=state_dict, safe_serialization=True)
                    save_merged_lora(unwrapped, tmp, state_dict)
                else:
                    unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                _replace_dir(tmp, out)
            except _WRITE_ERRORS as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                error = _describe_write_error(exc)
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

try:  # safetensors raises its own exception type for I/O errors (e.g. ENOSPC)
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover
    _SafetensorError = OSError
# torch.save reports a failed write as RuntimeError ("PytorchStreamWriter failed writing file ...")
_WRITE_ERRORS = (OSError, RuntimeError, _SafetensorError)


def _describe_write_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final``; an existing ``final`` is moved aside first, then removed."""
    if final.exists():
        aside = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _any_process(acc, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (every process gets the same answer)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the lines of ``path`` whose ``step`` is at most ``step`` (and drop a torn last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line)
    _atomic_write_text(path, "".join(x + "\n" for x in kept))


def _record_consumed(cfg: TrainConfig) -> bool:
    return bool(getattr(cfg, "record_consumed", False)) or os.environ.get("FINEGRAIN_RECORD_CONSUMED", "") in ("1", "true")


def _check_process_count(acc) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and acc.num_processes != launched:
        raise ConfigError(
            f"{launched} processes were launched but the accelerator sees {acc.num_processes}; every process would "
            "train alone and write the same files. On a machine without GPUs launch with "
            "`finegrain <command> --accelerate_config multi_gpu --num_processes N` (which selects the CPU backend) "
            "or set ACCELERATE_USE_CPU=1"
        )


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _load_state_dict(model, weights: dict[str, torch.Tensor], where: Path) -> None:
    if _is_peft(model):  # a LoRA checkpoint holds the adapter only (peft's names, without the adapter name)
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, weights)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        missing = [k for k in trainable if k in set(result.missing_keys)]
        if missing or result.unexpected_keys:
            raise ConfigError(f"checkpoint {where} does not match the LoRA model: missing {missing[:5]}, "
                              f"unexpected {list(result.unexpected_keys)[:5]}")
        return
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
    if isinstance(v, float) and not math.isfinite(v):
        return None  # metrics.jsonl stays strict JSON: a skipped step's NaN norm is logged as null
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
