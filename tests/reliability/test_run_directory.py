"""Run-directory safety: a wrong model directory, a corrupt checkpoint and a finished run are refused up front.

Each case goes through the command line in-process (``finegrain.cli.main.main``): exit status 1, one line on stderr
that names the file that gave the problem away and what to pass instead, no traceback (``FINEGRAIN_DEBUG`` unset),
and every existing run directory byte-for-byte as it was (:func:`snapshot`).

1. A reward-model directory where a policy is expected (``po``/``sft``/``ppo --model_name_or_path``, ``eval
   --policy``), and a policy where a reward model is expected (``ppo --reward``).
2. ``--resume_from_checkpoint`` on a checkpoint whose ``model.safetensors`` is truncated (explicit path and
   ``latest``): the message names the file and the older complete checkpoint.
3. A second run into the ``--output_dir`` of a completed run without ``--overwrite_output_dir`` (the default
   ``--save_steps 0`` writes no checkpoint, which the old guard relied on).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scale"))
import _runs as R  # noqa: E402

from finegrain.cli.main import main as cli_main  # noqa: E402
from finegrain.trainers import loop  # noqa: E402

pytestmark = pytest.mark.smoke


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path) with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, command: str, args: list[str]) -> str:
    """Run ``finegrain command args``; assert exit 1 and a one-line error without traceback; return the line."""
    capsys.readouterr()
    status = cli_main([command, *args])
    err = capsys.readouterr().err.strip()
    assert status == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"finegrain {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    model = R.tiny_model_dir(root / "model", "llama")
    return {
        "root": root,
        "model": model,
        "pairs": R.write_rows(root / "pairs.jsonl", R.preference_rows(16)),
        "prompts": R.write_rows(root / "prompts.jsonl", R.prompt_rows(40)),
        "sft": R.write_sft_rows(root / "sft.jsonl", 16),
    }


def _po(inputs, out: Path, steps: int = 1, extra: list[str] = ()) -> list[str]:
    return R.model_args(inputs["model"], inputs["pairs"], out, steps=steps, batch=2, extra=list(extra))


@pytest.fixture(scope="module")
def reward_model(inputs):
    out = inputs["root"] / "rm"
    assert cli_main(["rm", "--level", "sequence", *R.model_args(inputs["model"], inputs["pairs"], out, steps=1,
                                                                 batch=2)]) == 0
    return out


@pytest.fixture(scope="module")
def completed_po(inputs):
    out = inputs["root"] / "po-done"
    assert cli_main(["po", "--loss", "dpo", *_po(inputs, out)]) == 0
    return out


@pytest.mark.parametrize("where", ["run", "final"])
def test_a_reward_model_is_refused_where_a_policy_is_expected(inputs, reward_model, capsys, where):
    rm_dir = reward_model if where == "run" else reward_model / "final"
    before = snapshot(reward_model)
    cases = [
        ("po", ["--loss", "dpo", *_po(inputs, inputs["root"] / "po-from-rm")], "--model_name_or_path"),
        ("sft", ["--model_name_or_path", str(rm_dir), "--dataset_name", str(inputs["sft"]),
                 "--output_dir", str(inputs["root"] / "sft-from-rm")], "--model_name_or_path"),
        ("ppo", ["--model_name_or_path", str(rm_dir), "--dataset_name", str(inputs["prompts"]),
                 "--reward", "python:_runs:brevity_reward", "--output_dir", str(inputs["root"] / "ppo-from-rm")],
         "--model_name_or_path"),
        ("eval", ["--policy", str(rm_dir), "--reference", str(inputs["model"]), "--prompts",
                  str(inputs["prompts"]), "--judge", str(reward_model / "final"), "--output_dir",
                  str(inputs["root"] / "eval-from-rm")], "--policy"),
    ]
    for command, args, role in cases:
        args = [str(rm_dir) if a == str(inputs["model"]) and command == "po" else a for a in args]
        line = refused(capsys, command, args)
        assert role in line and "finegrain_reward.json" in line and "reward model" in line, line
    assert snapshot(reward_model) == before
    for name in ("po-from-rm", "sft-from-rm", "ppo-from-rm", "eval-from-rm"):
        assert not (inputs["root"] / name).exists()  # nothing was written for the refused runs


def test_a_policy_is_refused_where_a_reward_model_is_expected(inputs, completed_po, capsys):
    line = refused(capsys, "ppo", ["--model_name_or_path", str(inputs["model"]), "--dataset_name",
                                   str(inputs["prompts"]), "--reward", str(completed_po / "final"),
                                   "--output_dir", str(inputs["root"] / "ppo-policy-reward")])
    assert "finegrain_reward.json" in line and str(completed_po / "final") in line, line
    assert not (inputs["root"] / "ppo-policy-reward").exists()


def test_a_run_directory_loads_its_final_model(inputs, completed_po):
    """``--model_name_or_path RUN`` means ``RUN/final`` (as ``finegrain eval`` always did)."""
    out = inputs["root"] / "po-from-run-dir"
    assert cli_main(["po", "--loss", "dpo", *[str(completed_po) if a == str(inputs["model"]) else a
                                              for a in _po(inputs, out)]]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_a_truncated_checkpoint_is_refused_naming_the_file_and_the_older_one(inputs, capsys):
    out = inputs["root"] / "po-ckpt"
    assert cli_main(["po", "--loss", "dpo", *_po(inputs, out, steps=2, extra=["--save_steps", "1"])]) == 0
    ckpts = loop.checkpoint_dirs(out)
    assert [c.name for c in ckpts] == ["step-000001", "step-000002"]
    weights = ckpts[-1] / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "model.safetensors" in loop.checkpoint_problem(ckpts[-1])
    assert loop.checkpoint_problem(ckpts[0]) is None
    before = snapshot(out)
    for target in (str(ckpts[-1]), "latest"):
        line = refused(capsys, "po", ["--loss", "dpo", *_po(inputs, out, steps=3,
                                                            extra=["--resume_from_checkpoint", target])])
        assert str(weights) in line and "truncated" in line, line
        assert str(ckpts[0]) in line and "--resume_from_checkpoint" in line, line
        assert snapshot(out) == before
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    # the older checkpoint named in the message resumes
    assert cli_main(["po", "--loss", "dpo", *_po(inputs, out, steps=3,
                                                 extra=["--resume_from_checkpoint", str(ckpts[0])])]) == 0


@pytest.mark.parametrize("damage", ["optim.pt", "trainer_state.json", "no-weights"])
def test_checkpoint_problem_names_each_unreadable_file(inputs, damage):
    out = inputs["root"] / f"po-damage-{damage}"
    assert cli_main(["po", "--loss", "dpo", *_po(inputs, out, steps=1, extra=["--save_steps", "1"])]) == 0
    ckpt = loop.checkpoint_dirs(out)[-1]
    if damage == "no-weights":
        for f in (ckpt / "model").glob("*.safetensors"):
            f.unlink()
        expected = "has no weights"
    else:
        f = ckpt / damage
        f.write_bytes(f.read_bytes()[:20])
        expected = damage
    problem = loop.checkpoint_problem(ckpt)
    assert problem is not None and expected in problem


def test_a_completed_run_is_not_overwritten_without_the_flag(inputs, completed_po, capsys):
    before = snapshot(completed_po)
    assert not loop.checkpoint_dirs(completed_po)  # default --save_steps 0: no checkpoint to trip the old guard
    line = refused(capsys, "po", ["--loss", "dpo", *_po(inputs, completed_po)])
    assert "already holds a run" in line and "completed" in line and "--overwrite_output_dir" in line, line
    assert snapshot(completed_po) == before


def test_overwrite_output_dir_replaces_a_completed_run(inputs, tmp_path):
    out = tmp_path / "po"
    assert cli_main(["po", "--loss", "dpo", *_po(inputs, out)]) == 0
    (out / "run.json").write_text(json.dumps({"status": "completed", "started": "yesterday", "stale": 1}))
    assert cli_main(["po", "--loss", "dpo", *_po(inputs, out, extra=["--overwrite_output_dir"])]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and "stale" not in info and info["started"] != "yesterday"
