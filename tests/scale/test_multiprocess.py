"""The same global batch gives the same update, however it is split over processes and accumulation steps.

Every trainer normalises its loss by a global-batch denominator (times the number of processes, which DDP's gradient
averaging divides out), so these runs must agree up to float32 summation order:

* 1 process, per-device batch 8 (the reference);
* 2 CPU processes (gloo, launched by ``finegrain <command> --accelerate_config multi_gpu --num_processes 2``),
  per-device batch 4;
* 1 process, per-device batch 4 with 2 accumulation steps;
* 2 processes, per-device batch 2 with 2 accumulation steps.

Tolerances (float32 on CPU, a few AdamW steps): every logged loss within 1e-5 relative, and the final weights within
1e-3 of the reference's own update: ``‖w − w_ref‖ / ‖w_ref − w_0‖ < 1e-3`` (measured: about 1e-6 for accumulation in
one process, about 1e-5 across processes; Adam's normalisation amplifies summation-order noise in near-zero gradients,
hence the margin). The examples each step consumed must be identical.

The 2-process tests are parametrised over every training command whose module exists; commands not yet in
``COVERED`` run as non-strict xfail until their harness options are settled (see tests/scale/_runs.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runs as R  # noqa: E402

LOSS_RTOL = 1e-5
UPDATE_RTOL = 1e-3
COVERED = {"sft"}  # commands whose multi-process runs are verified; the others xfail (non-strict) until added


def _commands():
    for command in R.TRAINERS:
        marks = [] if command in COVERED else [pytest.mark.xfail(reason=f"{command}: multi-process coverage not yet "
                                                                 "verified (add it to COVERED)", strict=False)]
        yield pytest.param(command, marks=marks, id=command)


def _assert_same_run(ref: Path, other: Path, w0: dict, label: str) -> float:
    la, lb = R.losses(ref), R.losses(other)
    assert len(la) == len(lb) > 0
    for step, (a, b) in enumerate(zip(la, lb), 1):
        assert abs(a - b) <= LOSS_RTOL * abs(a), f"{label}: loss at step {step} {b} vs {a}"
    assert R.consumed(ref) == R.consumed(other), f"{label}: a different sequence of examples was consumed"
    err = R.relative_update_error(w0, R.weights(ref / "final"), R.weights(other / "final"))
    assert err < UPDATE_RTOL, f"{label}: final weights differ by {err:.2e} of the update"
    return err


@pytest.mark.smoke
def test_sft_accumulation_matches_the_larger_batch(tmp_path):
    """In one process: batch 8 x 1 step == batch 4 x 2 accumulation steps == batch 2 x 4 (tiny Llama, 4 steps)."""
    from finegrain.trainers import sft

    model = R.tiny_model_dir(tmp_path / "model", "llama")
    data = R.write_sft_rows(tmp_path / "rows.jsonl", 64)
    runs = {}
    for b, k in [(8, 1), (4, 2), (2, 4)]:
        runs[(b, k)] = tmp_path / f"b{b}k{k}"
        sft.main(R.model_args(model, data, runs[(b, k)], steps=4, batch=b, accumulation=k, lr=1e-3))
    w0 = R.weights(model)
    assert R.max_abs_diff(w0, R.weights(runs[(8, 1)] / "final")) > 1e-4  # training moved the weights
    for key in [(4, 2), (2, 4)]:
        _assert_same_run(runs[(8, 1)], runs[key], w0, f"batch {key[0]} x accumulation {key[1]}")
    # the comparison can fail: a different global batch gives a different update
    other = tmp_path / "b4k1"
    sft.main(R.model_args(model, data, other, steps=4, batch=4, accumulation=1, lr=1e-3))
    assert R.relative_update_error(w0, R.weights(runs[(8, 1)] / "final"), R.weights(other / "final")) > 100 * UPDATE_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("command", list(_commands()))
def test_two_processes_and_accumulation_match_one_process(command, tiny_world, tmp_path):
    """World runs of ``command``: 2 processes, accumulation, and both together equal the 1-process batch-8 run."""
    ref = tmp_path / "p1-b8-k1"
    R.cli(command, R.world_args(command, tiny_world, ref, steps=3, batch=8))
    w0_dir = tmp_path / "p1-b8-k1-step0"  # the initial weights: a 0-learning-rate run of the same command
    R.cli(command, R.world_args(command, tiny_world, w0_dir, steps=1, batch=8, lr=0.0))
    w0 = R.weights(w0_dir / "final")
    for processes, batch, accumulation in [(2, 4, 1), (1, 4, 2), (2, 2, 2)]:
        out = tmp_path / f"p{processes}-b{batch}-k{accumulation}"
        R.cli(command, R.world_args(command, tiny_world, out, steps=3, batch=batch, accumulation=accumulation),
              processes=processes)
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "completed"
        _assert_same_run(ref, out, w0, f"{command}: {processes} processes x batch {batch} x accumulation {accumulation}")
