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

The 2-process test runs every training command (sft, po, rm, ppo); what "the same global batch" means for each is in
tests/scale/_runs.py. Two commands need a word:

* ppo samples its own data. Its sampling groups (``--generation_batch_size``) draw from random streams named by their
  place in the data, so every split samples the same responses: the test also asks for the same rewards and response
  lengths. Its loss (``policy/loss``) is a mean of whitened, unit-scale advantages that cancels to about 1e-2, so it is
  compared in absolute terms against that unit scale (1e-5).
* rm trains with ``--center_rewards_coefficient 0.01`` here. Without it the Bradley–Terry loss is blind to the score
  head's bias (it sees only reward differences): the bias's gradient is pure summation-order noise, exactly 0 in one
  process and about 1e-9 over two, which AdamW turns into learning-rate-sized steps (measured: 1.6e-3 of the update).
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
LOSS_SCALE = {"ppo": 1.0}  # losses compared against this scale rather than their own size (module docstring)
SAME_SAMPLES = {"ppo": ("rewards/raw", "response/length", "oracle/reward")}  # metrics of what a step sampled
OPTIONS = {"rm": ["--center_rewards_coefficient", "0.01"]}  # see the module docstring


def _assert_same_run(ref: Path, other: Path, w0: dict, label: str, command: str = "sft") -> float:
    la, lb = R.losses(ref), R.losses(other)
    assert len(la) == len(lb) > 0
    for step, (a, b) in enumerate(zip(la, lb), 1):
        assert abs(a - b) <= LOSS_RTOL * max(abs(a), LOSS_SCALE.get(command, 0.0)), f"{label}: loss at step {step} {b} vs {a}"
    for key in SAME_SAMPLES.get(command, ()):
        a, b = [r[key] for r in R.metrics(ref)], [r[key] for r in R.metrics(other)]
        assert b == pytest.approx(a, rel=1e-6, abs=1e-6), f"{label}: {key} differs (other samples were drawn)"
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
@pytest.mark.parametrize("command", R.TRAINERS)
def test_two_processes_and_accumulation_match_one_process(command, tiny_world, tmp_path):
    """World runs of ``command``: 2 processes, accumulation, and both together equal the 1-process batch-8 run."""
    extra = OPTIONS.get(command, [])
    ref = tmp_path / "p1-b8-k1"
    R.cli(command, R.world_args(command, tiny_world, ref, steps=3, batch=8, extra=extra))
    w0_dir = tmp_path / "p1-b8-k1-step0"  # the initial weights: a 0-learning-rate run of the same command
    R.cli(command, R.world_args(command, tiny_world, w0_dir, steps=1, batch=8, lr=0.0, extra=extra))
    w0 = R.weights(w0_dir / "final")
    assert R.max_abs_diff(w0, R.weights(ref / "final")) > 1e-4  # training moved the weights
    assert len(R.consumed(ref)) == 3
    for processes, batch, accumulation in [(2, 4, 1), (1, 4, 2), (2, 2, 2)]:
        out = tmp_path / f"p{processes}-b{batch}-k{accumulation}"
        R.cli(command, R.world_args(command, tiny_world, out, steps=3, batch=batch, accumulation=accumulation,
                                    processes=processes, extra=extra), processes=processes)
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "completed"
        _assert_same_run(ref, out, w0, f"{command}: {processes} processes x batch {batch} x accumulation {accumulation}",
                         command)
