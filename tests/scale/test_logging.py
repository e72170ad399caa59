"""Logging: metrics.jsonl always, TensorBoard through accelerate's tracker when installed, a progress bar that shows
the loss, and one summary line at the end (also stored in run.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runs as R  # noqa: E402

from finegrain.cli import commands  # noqa: E402

pytestmark = pytest.mark.smoke


def _run(tmp_path, extra):

    model = R.tiny_model_dir(tmp_path / "model", "llama")
    data = R.write_sft_rows(tmp_path / "rows.jsonl", 32)
    args = [a for a in R.model_args(model, data, tmp_path / "run", steps=4, batch=8) if a != "--disable_tqdm"]
    commands.sft(args + extra)
    return tmp_path / "run"


def test_metrics_progress_bar_and_summary_line(tmp_path, capsys):
    run = _run(tmp_path, ["--logging_steps", "2"])
    err = capsys.readouterr().err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert {"loss", "grad_norm", "skipped", "nonfinite_total", "learning_rate", "samples"} <= rows[0].keys()
    assert "loss=" in err  # the progress bar's postfix
    summary = [ln for ln in err.splitlines() if ln.startswith("finegrain sft (sft) completed")]
    assert len(summary) == 1, err[-2000:]
    assert "4 steps" in summary[0] and f"train loss {rows[-1]['loss']:.4g}" in summary[0] and str(run) in summary[0]
    info = json.loads((run / "run.json").read_text())
    assert info["summary"]["train"]["loss"] == rows[-1]["loss"]


def test_tensorboard_tracker_writes_events(tmp_path):
    pytest.importorskip("tensorboard", reason="optional extra finegrain[tensorboard] not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(tmp_path, ["--report_to", "tensorboard", "--logging_steps", "1"])
    events = sorted(run.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under the run directory"
    logged = []
    for directory in sorted({e.parent for e in events}):  # accelerate writes hparams to a sub-folder
        acc = EventAccumulator(str(directory))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            logged += [e.value for e in acc.Scalars("train/loss")]
    expected = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert logged == pytest.approx(expected, rel=1e-6)


def test_an_unavailable_tracker_warns_and_keeps_metrics(tmp_path, capsys, monkeypatch):
    import accelerate.tracking as tracking

    monkeypatch.setattr(tracking, "is_wandb_available", lambda: False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = _run(tmp_path, ["--report_to", "wandb"])
    err = capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text().strip()
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert "warning: trackers wandb not available" in err
