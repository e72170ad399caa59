"""Disk, permission and numerical faults while training: a clear error, the previous checkpoint intact, a resumable run.

Disk faults are injected while the *second* checkpoint is written (the first one is complete):

* simulated full disk: the optimizer-state write raises ``ENOSPC`` (as ``torch.save`` does on a full disk);
* simulated read-only directory: the final rename raises ``EROFS``;
* a real full disk: a small tmpfs sized to hold one checkpoint (needs root and mount; skipped otherwise);
* a real read-only directory: ``checkpoints/`` bind-mounted read-only after the first checkpoint (same needs).

Numerical faults: a non-finite loss/gradient skips the step (weights, optimizer moments and the schedule untouched),
is logged (``skipped``, ``nonfinite_total``; in sft and rm runs here), and ``--max_nonfinite_steps`` consecutive skips stop the run with a
message that says what to change; a model with NaN weights stops with that message through the CLI (exit 1).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scale"))
import _runs as R  # noqa: E402

from finegrain.cli import commands  # noqa: E402
from finegrain.errors import FinegrainError, NonFiniteError  # noqa: E402
from finegrain.trainers import loop, rm  # noqa: E402

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return R.tiny_model_dir(root / "model", "llama"), R.write_sft_rows(root / "rows.jsonl", 32)


def _train(tiny, out, steps=3, extra=()):
    model, data = tiny
    return commands.sft(R.model_args(model, data, out, steps=steps, batch=4, extra=["--save_steps", "1", *extra]))


def _fail_on_second_checkpoint(monkeypatch, fault):
    """Run ``fault()`` (which installs a patch) just before the second checkpoint is written."""
    original = loop.Run.save_checkpoint
    calls = {"n": 0}

    def wrapped(self, state, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            fault()
        return original(self, state, *args, **kwargs)

    monkeypatch.setattr(loop.Run, "save_checkpoint", wrapped)


def _assert_failed_cleanly(out: Path, exc: BaseException, reason: str) -> None:
    msg = str(exc)
    assert reason in msg and "step-000002" in msg
    assert "previous checkpoint" in msg and "step-000001" in msg and "--resume_from_checkpoint latest" in msg
    assert [d.name for d in loop.checkpoint_dirs(out)] == ["step-000001"]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial copy is removed
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and reason in info["error"]


def _assert_resumes(tiny, out: Path) -> None:
    _train(tiny, out, extra=["--resume_from_checkpoint", "latest"])
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert R.consumed(out) and len(R.consumed(out)) == 3


def test_full_disk_while_checkpointing_is_a_clear_error(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk():
        def save(obj, f, *a, **k):
            if str(f).endswith("optim.pt"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real_save(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)

    _fail_on_second_checkpoint(monkeypatch, full_disk)
    with pytest.raises(FinegrainError) as info:
        _train(tiny, out)
    _assert_failed_cleanly(out, info.value, "No space left on device")
    monkeypatch.undo()
    _assert_resumes(tiny, out)


def test_read_only_directory_while_checkpointing_is_a_clear_error(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_replace = os.replace

    def read_only():
        def replace(src, dst, *a, **k):
            if "step-000002" in str(dst):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)

    _fail_on_second_checkpoint(monkeypatch, read_only)
    with pytest.raises(FinegrainError) as info:
        _train(tiny, out)
    _assert_failed_cleanly(out, info.value, "Read-only file system")
    monkeypatch.undo()
    _assert_resumes(tiny, out)


def _can_mount(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(path)], check=True)
    return ok


def test_a_real_full_disk_keeps_the_previous_checkpoint(tiny, tmp_path):
    probe = tmp_path / "probe"
    if not _can_mount(tmp_path / "m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    _train(tiny, probe, steps=1)  # measure one checkpoint (plus the run's own files)
    one = sum(f.stat().st_size for f in (probe / "checkpoints").rglob("*") if f.is_file())
    rest = sum(f.stat().st_size for f in probe.glob("*") if f.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    size_kib = (int(1.5 * one) + rest + 64 * 1024) // 1024  # room for one checkpoint, not for two
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "run"
        with pytest.raises(FinegrainError) as info:
            _train(tiny, out)
        _assert_failed_cleanly(out, info.value, "")
        assert "space" in str(info.value).lower() or "os error 28" in str(info.value)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_real_read_only_directory_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    if not _can_mount(tmp_path / "m"):
        pytest.skip("cannot mount here (needs root and mount)")
    out = tmp_path / "run"
    mounted = []

    def read_only():
        ck = str(out / "checkpoints")
        subprocess.run(["mount", "--bind", ck, ck], check=True)
        mounted.append(ck)
        subprocess.run(["mount", "-o", "remount,bind,ro", ck], check=True)

    _fail_on_second_checkpoint(monkeypatch, read_only)
    try:
        with pytest.raises(FinegrainError) as info:
            _train(tiny, out)
        assert "Read-only file system" in str(info.value)
        assert "step-000001 is intact" in str(info.value)
    finally:
        for m in mounted:
            subprocess.run(["umount", "-l", m], check=False)
    _assert_failed_cleanly(out, info.value, "Read-only file system")
    monkeypatch.undo()
    _assert_resumes(tiny, out)


# ----------------------------------------------------------------------------------------------- numerical guards


def _toy_run(tmp_path, **cfg_changes):
    from finegrain.config import TrainConfig

    cfg = TrainConfig(output_dir=str(tmp_path / "toy"), max_steps=10, learning_rate=0.1, disable_tqdm=True,
                      **cfg_changes)
    acc = loop.make_accelerator(cfg)
    run = loop.Run(cfg, "sft", "toy", acc)
    model = torch.nn.Linear(3, 2)
    optimizer = loop.make_optimizer(cfg, model.parameters())
    scheduler = loop.make_scheduler(cfg, optimizer, 10)
    return run, model, optimizer, scheduler


def _step(run, state, model, optimizer, scheduler, poison: bool):
    x = torch.ones(4, 3)
    loss = model(x).pow(2).mean() * (float("nan") if poison else 1.0)
    loss.backward()
    out = loop.optimizer_step(run, state, model, optimizer, scheduler, loss)
    state.step += 1
    return out


def test_a_nonfinite_step_is_skipped_untouched_and_counted(tmp_path):
    run, model, opt, sched = _toy_run(tmp_path, max_nonfinite_steps=3)
    state = loop.RunState()
    _step(run, state, model, opt, sched, poison=False)
    before = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    lr = sched.get_last_lr()[0]
    stats = _step(run, state, model, opt, sched, poison=True)
    assert stats["skipped"] == 1.0 and stats["nonfinite_total"] == 1.0 and stats["grad_norm"] != stats["grad_norm"]
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # weights untouched
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))  # moments too
    assert sched.get_last_lr()[0] == lr  # the schedule did not advance
    assert all(p.grad is None for p in model.parameters())  # the poisoned gradients are gone
    stats = _step(run, state, model, opt, sched, poison=False)  # a good step resets the streak
    assert stats["skipped"] == 0.0 and state.nonfinite_streak == 0 and state.nonfinite_total == 1
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    run.close("completed")


def test_k_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    run, model, opt, sched = _toy_run(tmp_path, max_nonfinite_steps=3)
    state = loop.RunState()
    _step(run, state, model, opt, sched, poison=True)
    _step(run, state, model, opt, sched, poison=True)
    with pytest.raises(NonFiniteError, match="3 consecutive steps had a non-finite loss or gradient") as info:
        _step(run, state, model, opt, sched, poison=True)
    assert "--learning_rate" in str(info.value) and state.nonfinite_total == 3
    run.close("failed")


def test_transient_nan_in_sft_is_logged_and_training_goes_on(tiny, tmp_path, monkeypatch):
    """A forward hook poisons the logits' hidden states on the 2nd and 3rd optimizer steps of a 5-step SFT run."""
    from finegrain.models import forward

    real = forward.hidden_states
    calls = {"n": 0}

    def poisoned(model, batch, *a, **k):
        calls["n"] += 1
        h = real(model, batch, *a, **k)
        return h * float("nan") if calls["n"] in (2, 3) else h

    monkeypatch.setattr(forward, "hidden_states", poisoned)  # sft reads it through forward.completion_token_logps
    out = tmp_path / "run"
    model, data = tiny
    commands.sft(R.model_args(model, data, out, steps=5, batch=4, extra=["--logging_steps", "10"]))
    rows = R.metrics(out)
    assert [r["step"] for r in rows] == [2, 3, 5]  # skipped steps are always logged, and the last one
    assert [r["skipped"] for r in rows] == [1.0, 1.0, 0.0]
    assert [r["nonfinite_total"] for r in rows] == [1.0, 2.0, 2.0]
    assert rows[0]["loss"] is None and rows[0]["grad_norm"] is None  # strict JSON: null, not NaN
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["skipped_steps"] == 2


def test_transient_nan_in_rm_is_logged_and_training_goes_on(tiny, tmp_path, monkeypatch):
    """The reward-model trainer too: a poisoned loss on the 2nd and 3rd of 5 steps is skipped and logged."""

    real = rm.example_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses, stats = real(*args, **kwargs)
        return (losses * float("nan"), stats) if calls["n"] in (2, 3) else (losses, stats)

    monkeypatch.setattr(rm, "example_losses", poisoned)
    model, _ = tiny
    data = R.write_rows(tmp_path / "pairs.jsonl", R.preference_rows(16))
    out = tmp_path / "run"
    commands.rm(R.model_args(model, data, out, steps=5, batch=4, extra=["--logging_steps", "10"]))
    rows = R.metrics(out)
    assert [r["step"] for r in rows] == [2, 3, 5]
    assert [r["skipped"] for r in rows] == [1.0, 1.0, 0.0] and rows[0]["loss"] is None
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["skipped_steps"] == 2


@pytest.mark.slow  # a subprocess: the CLI's exit code and message
def test_nan_weights_stop_the_cli_with_a_clear_message(tmp_path):
    from safetensors.torch import load_file, save_file

    model = R.tiny_model_dir(tmp_path / "model", "llama")
    f = model / "model.safetensors"
    w = load_file(f)
    w = {k: (v * float("nan") if "embed_tokens" in k else v) for k, v in w.items()}
    save_file(w, f, metadata={"format": "pt"})
    data = R.write_sft_rows(tmp_path / "rows.jsonl", 32)
    out = tmp_path / "run"
    proc = R.cli("sft", R.model_args(model, data, out, steps=10, batch=4, extra=["--max_nonfinite_steps", "2"]),
                 check=False, timeout=240)
    assert proc.returncode == 1
    assert "2 consecutive steps had a non-finite loss or gradient" in proc.stderr
    assert "Traceback" not in proc.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "NonFiniteError" in info["error"]
