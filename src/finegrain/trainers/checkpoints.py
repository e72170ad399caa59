"""Checkpoint files: which checkpoints a run has, what makes one unusable, atomic writes, weights and RNG states.

A checkpoint ``RUN_DIR/checkpoints/step-000042/`` holds ``model/`` (and a folder per extra model) in Hugging Face
format, ``optim.pt`` (optimizer and scheduler), one ``rng-<rank>.pt`` per process and ``trainer_state.json``
(:class:`finegrain.trainers.rundir.RunState`); :class:`finegrain.trainers.rundir.Run` writes and reads them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from finegrain.data.files import write_text
from finegrain.errors import ConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"

__all__ = ["CHECKPOINTS", "STATE_FILE", "WRITE_ERRORS", "checkpoint_dirs", "checkpoint_problem",
           "describe_write_error", "load_state_dict_into", "replace_dir", "rng_file", "rng_state", "set_rng_state",
           "step_of", "truncate_jsonl"]


def step_of(checkpoint: Path) -> int:
    try:
        return int(checkpoint.name.split("-")[1])
    except (IndexError, ValueError):
        return -1


def checkpoint_problem(path: str | Path) -> str | None:
    """What makes checkpoint ``path`` unusable (naming the file), or None when every file of it reads.

    Checked without loading the tensors: ``trainer_state.json`` parses, ``optim.pt`` and the RNG files are complete
    zip archives (what ``torch.save`` writes), every ``*.safetensors`` file's header covers the whole file (a
    truncated one fails here), and the policy's folder ``model/`` has weights.
    """
    import zipfile

    from safetensors import safe_open

    path = Path(path)
    state = path / STATE_FILE
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError) as exc:
        return f"{state} is unreadable ({exc})"
    if not isinstance(data, dict) or not isinstance(data.get("step"), int):
        return f"{state} has no step count"
    for f in [path / "optim.pt", rng_file(path, 0), *sorted(path.glob("rng-*.pt"))]:
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


def rng_file(checkpoint: Path, rank: int) -> Path:
    """The RNG state process ``rank`` resumes from: its own ``rng-<rank>.pt``; rank 0's when the checkpoint was
    written by fewer processes; ``rng.pt`` in checkpoints of finegrain 0.1 (one file, rank 0's)."""
    for name in (f"rng-{rank}.pt", "rng-0.pt", "rng.pt"):
        if (checkpoint / name).is_file():
            return checkpoint / name
    return checkpoint / "rng-0.pt"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / STATE_FILE).is_file()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


# torch.save reports a failed write as RuntimeError ("PytorchStreamWriter failed writing file ...");
# safetensors raises its own exception type for I/O errors (e.g. ENOSPC)
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def describe_write_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final``; an existing ``final`` is moved aside first, then removed."""
    aside = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def truncate_jsonl(path: Path, step: int) -> None:
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
    write_text(path, "".join(x + "\n" for x in kept))


def load_state_dict_into(model, weights: dict[str, torch.Tensor], where: Path) -> None:
    if hasattr(model, "peft_config"):  # a LoRA checkpoint holds the adapter only (peft's names, without the adapter name)
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


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npv = state["numpy"]
    np.random.set_state((npv[0], npv[1].numpy().astype(np.uint32), int(npv[2]), int(npv[3]), npv[4]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
