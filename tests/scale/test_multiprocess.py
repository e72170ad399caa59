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
from _runs import one_torch_thread  # noqa: E402,F401 (autouse fixture)

from finegrain.cli import commands  # noqa: E402

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

    model = R.tiny_model_dir(tmp_path / "model", "llama")
    data = R.write_sft_rows(tmp_path / "rows.jsonl", 64)
    runs = {}
    for b, k in [(8, 1), (4, 2), (2, 4)]:
        runs[(b, k)] = tmp_path / f"b{b}k{k}"
        commands.sft(R.model_args(model, data, runs[(b, k)], steps=4, batch=b, accumulation=k, lr=1e-3))
    w0 = R.weights(model)
    assert R.max_abs_diff(w0, R.weights(runs[(8, 1)] / "final")) > 1e-4  # training moved the weights
    for key in [(4, 2), (2, 4)]:
        _assert_same_run(runs[(8, 1)], runs[key], w0, f"batch {key[0]} x accumulation {key[1]}")
    # the comparison can fail: a different global batch gives a different update
    other = tmp_path / "b4k1"
    commands.sft(R.model_args(model, data, other, steps=4, batch=4, accumulation=1, lr=1e-3))
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
        label = f"{command}: {processes} processes x batch {batch} x accumulation {accumulation}"
        err = _assert_same_run(ref, out, w0, label, command)
        print(f"{label}: relative update error {err:.1e}")  # shown with -s; quoted in docs/scaling.md


@pytest.mark.smoke
def test_ppo_samples_and_minibatches_do_not_depend_on_the_process_count(tmp_path):
    """In one process, without launching: ppo's rollout of 8 prompts (2 samples each, sampling groups of 2 prompts)
    and its minibatches are the same whether one process holds all the prompts or two hold 4 each."""
    import torch

    from finegrain.config import parse
    from finegrain.data.prepared import CompletionData
    from finegrain.data.tokenize import TokenLimits
    from finegrain.models.loading import load_causal_lm, load_tokenizer
    from finegrain.rl.streams import RolloutPlace, minibatch_rows, sample_groups
    from finegrain.trainers.ppo import PPOConfig

    model_dir = R.tiny_model_dir(tmp_path / "model", "llama")
    data = R.write_rows(tmp_path / "prompts.jsonl", R.prompt_rows(8))
    tok, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir)).eval()
    prompts = CompletionData.from_source(str(data), tok, split=None, kind="prompt",
                                         limits=TokenLimits(max_length=64, max_prompt_length=32))
    cfg = parse(PPOConfig, ["--rollout_batch_size", "8", "--generation_batch_size", "2", "--num_samples", "2",
                            "--num_mini_batches", "2", "--max_new_tokens", "12", "--max_length", "64",
                            "--max_prompt_length", "32", "--seed", "3"], "finegrain ppo")
    order = [5, 2, 7, 0, 1, 6, 3, 4]  # a global rollout batch

    def place(rank, processes, streams=True):
        return RolloutPlace(cfg.seed, 0, 1, 2, rank * (8 // processes) // 2, streams)

    def rows(batch):  # each sampled response, without padding
        return [ids[m].tolist() for ids, m in zip(batch.completion_input_ids, batch.completion_mask.bool())]

    sampling = dict(num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    one = sample_groups(model, prompts, order, place(0, 1), tok, "cpu", **sampling)
    two = [sample_groups(model, prompts, order[4 * r : 4 * r + 4], place(r, 2), tok, "cpu", **sampling)
           for r in (0, 1)]
    assert rows(one) == rows(two[0]) + rows(two[1])
    assert len(set(map(tuple, rows(one)))) > 4  # really sampled: the responses differ
    for ppo_epoch in (0, 1):
        whole = minibatch_rows(16, place(0, 1), cfg.num_samples, cfg.num_mini_batches, ppo_epoch)
        shards = [minibatch_rows(8, place(r, 2), cfg.num_samples, cfg.num_mini_batches, ppo_epoch) for r in (0, 1)]
        for j, mb in enumerate(whole):
            split = torch.cat([shards[0][j], shards[1][j] + 8])
            assert sorted(mb.tolist()) == sorted(split.tolist())  # the same rows in minibatch j
            assert len(shards[0][j]) == len(shards[1][j]) == 4
    # the check can fail: from the global RNG (no --generation_batch_size) each process draws the same numbers for
    # different prompts, so the second process's responses are not the single process's
    torch.manual_seed(0)
    alone = sample_groups(model, prompts, order, place(0, 1, streams=False), tok, "cpu", **sampling)
    torch.manual_seed(0)
    second = sample_groups(model, prompts, order[4:], place(1, 2, streams=False), tok, "cpu", **sampling)
    assert rows(second) != rows(alone)[8:]
