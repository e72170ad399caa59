"""Killed, interrupted and half-written runs resume with nothing lost and nothing repeated (subprocess runs).

Each case runs for every training command (sft, po, rm, ppo) and is compared with one uninterrupted run of the same
command and options: the resumed run's final weights, and every model of its last checkpoint (ppo's critic too), must
equal it bitwise (CPU, one thread), every logged metric but the wall-clock timings must be identical (training and
evaluation), and ``consumed.jsonl`` (``--record_consumed``: the example indices of every optimizer step; ppo: the
prompts of every rollout batch) must list the same batches, each step once. The SIGKILL-after-a-checkpoint case also
runs the sentence-level reward model (``rm --level sentence``), whose set-up draws random numbers (the embedding row of
its inserted ``<END>`` token).

* SIGKILL after a checkpoint: the run dies mid-way; ``--resume_from_checkpoint latest`` continues from the newest
  complete checkpoint.
* SIGKILL during a checkpoint write (``FINEGRAIN_TEST_CHECKPOINT_PAUSE`` holds the writer between its temporary
  directory and the rename): the previous checkpoint is intact and is the one resumed.
* SIGINT (Ctrl-C): the run writes a checkpoint, marks run.json ``interrupted`` and exits with 130.

The killed runs sleep after each optimizer step (``FINEGRAIN_TEST_STEP_SLEEP``) only so that the signal lands at a
known point; the sleep changes no numbers. ppo takes 8 optimizer steps per rollout batch here (2 minibatches x 2 epochs,
policy and critic), so it sleeps less per optimizer step.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scale"))
import _runs as R  # noqa: E402

from finegrain.trainers.loop import checkpoint_dirs  # noqa: E402

pytestmark = pytest.mark.slow
STEPS, SAVE_EVERY = 8, 2
STEP_SLEEP = {"ppo": "0.05"}  # seconds after each optimizer step; default 0.4
VARIANTS = {"rm-sentence": ("rm", ["--level", "sentence"])}  # case -> (command, options)


def _command(case: str) -> str:
    return VARIANTS.get(case, (case, []))[0]


def _args(case, world, out, extra=()):
    command, options = VARIANTS.get(case, (case, []))
    return R.world_args(command, world, out, steps=STEPS, batch=8,
                        extra=["--save_steps", str(SAVE_EVERY), *options, *extra])


@pytest.fixture(scope="module")
def references(tiny_world, tmp_path_factory):
    """One uninterrupted run per case, shared by the tests below."""
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            out = tmp_path_factory.mktemp(f"reference-{case}") / "run"
            R.cli(_command(case), _args(case, tiny_world, out))
            cache[case] = out
        return cache[case]

    return get


def _assert_nothing_lost(resumed: Path, reference: Path) -> None:
    assert json.loads((resumed / "run.json").read_text())["status"] == "completed"
    assert R.bitwise_equal(R.weights(resumed / "final"), R.weights(reference / "final")), "final weights differ"
    last, expected_last = checkpoint_dirs(resumed)[-1], checkpoint_dirs(reference)[-1]
    assert last.name == expected_last.name == f"step-{STEPS:06d}"
    models = sorted(d.name for d in expected_last.iterdir() if d.is_dir())
    assert models == sorted(d.name for d in last.iterdir() if d.is_dir())
    for name in models:  # the policy, and ppo's critic
        assert R.bitwise_equal(R.weights(last / name), R.weights(expected_last / name)), f"checkpoint {name} differs"
    assert R.losses(resumed) == R.losses(reference), "the logged losses differ"
    assert R.logged(resumed) == R.logged(reference), "a logged training metric differs"
    assert R.logged(resumed, "eval") == R.logged(reference, "eval"), "a logged evaluation metric differs"
    batches, expected = R.consumed(resumed), R.consumed(reference)
    assert batches == expected, "a batch was repeated, skipped or changed"
    assert len(batches) == STEPS


def _slow_env(command, **extra):
    return R.cli_env(FINEGRAIN_TEST_STEP_SLEEP=STEP_SLEEP.get(command, "0.4"), **extra)


@pytest.mark.parametrize("case", [*R.TRAINERS, *VARIANTS])
def test_sigkill_after_a_checkpoint_resumes_exactly(case, tiny_world, tmp_path, references):
    command = _command(case)
    out = tmp_path / "run"
    proc = R.start(command, _args(case, tiny_world, out), env=_slow_env(command))
    R.wait_for(lambda: any(d.name == "step-000004" for d in checkpoint_dirs(out)), proc, what="checkpoint 4")
    rc, _ = R.kill(proc, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not (out / "final").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # a killed run cannot say more
    R.cli(command, _args(case, tiny_world, out, ["--resume_from_checkpoint", "latest"]))
    _assert_nothing_lost(out, references(case))


@pytest.mark.parametrize("command", R.TRAINERS)
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(command, tiny_world, tmp_path, references):
    out = tmp_path / "run"
    proc = R.start(command, _args(command, tiny_world, out),
                   env=_slow_env(command, FINEGRAIN_TEST_CHECKPOINT_PAUSE="3"))

    def writing_step_4():
        return any((t / "trainer_state.json").exists() for t in (out / "checkpoints").glob(".tmp-step-000004"))

    R.wait_for(writing_step_4, proc, what="the write of checkpoint 4")
    R.kill(proc, signal.SIGKILL)
    assert [d.name for d in checkpoint_dirs(out)] == ["step-000002"]  # the half-written one is not taken
    assert list((out / "checkpoints").glob(".tmp-step-000004"))  # it was really killed mid-write
    R.cli(command, _args(command, tiny_world, out, ["--resume_from_checkpoint", "latest"]))
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the leftover is cleaned up
    _assert_nothing_lost(out, references(command))


@pytest.mark.parametrize("command", R.TRAINERS)
def test_sigint_checkpoints_exits_130_and_resumes_exactly(command, tiny_world, tmp_path, references):
    out = tmp_path / "run"
    proc = R.start(command, _args(command, tiny_world, out), env=_slow_env(command))
    R.wait_for(lambda: (out / "metrics.jsonl").exists() and len(R.metrics(out)) >= 3, proc, what="3 logged steps")
    rc, err = R.kill(proc, signal.SIGINT)
    assert rc == 130, err[-2000:]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted"
    stopped = info["steps"]
    assert 3 <= stopped < STEPS
    assert checkpoint_dirs(out)[-1].name == f"step-{stopped:06d}"  # the interrupted step was saved
    assert "interrupted" in err and "Traceback" not in err
    R.cli(command, _args(command, tiny_world, out, ["--resume_from_checkpoint", "latest"]))
    _assert_nothing_lost(out, references(command))
