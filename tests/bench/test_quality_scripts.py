"""The quality scripts under bench/ (po_quality, ppo_quality, rm_quality) run end to end on the tiny world.

They train through the library's public paths (``finegrain po`` / ``rm`` / ``ppo`` and the world's application
layer), which nothing else calls the way they do; each runs here as a command, at the smallest sizes its flags allow,
and its result JSON must have the keys the docs and the plots read, with finite numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def _numbers(obj, path: str = ""):
    """``(path, value)`` for every leaf of a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    else:
        yield path, obj


def _all_finite(obj, none_allowed: tuple[str, ...] = ()) -> None:
    """Every number of ``obj`` is finite; None only where a path ends with one of ``none_allowed``."""
    for path, value in _numbers(obj):
        if value is None:
            assert any(path.endswith(s) for s in none_allowed), path
        elif isinstance(value, float):
            assert math.isfinite(value), (path, value)


@pytest.mark.slow
def test_po_quality(tiny_world, tmp_path):
    """Every method, one seed, 2 steps of 4 pairs, 4 held-out prompts (about 15 s on 2 cores); then --replot."""
    methods = ("dpo", "tdpo1", "tdpo2", "treg", "treg-control", "treg-implicit", "treg-static", "dpo-sft")
    out = tmp_path / "po"
    _script("po_quality", "--methods", *methods, "--seeds", "0", "--steps", "2", "--batch", "4",
            "--checkpoints", "1", "--prompts", "4", "--samples", "1", "--world-dir", str(tiny_world),
            "--out", str(out), "--threads", "1")
    results = json.loads((tmp_path / "po.json").read_text())
    assert (tmp_path / "po.png").stat().st_size > 0
    assert {"settings", "sft", "runs", "final", "seconds", "world_format"} <= set(results)
    metrics = {"reward", "well_formed", "kl", "length"}
    assert set(results["sft"]) == metrics
    assert set(results["runs"]) == set(results["final"]) == set(methods)
    for method, runs in results["runs"].items():
        assert [r["seed"] for r in runs] == [0]
        assert [c["step"] for c in runs[0]["checkpoints"]] == [2]
        assert set(runs[0]["checkpoints"][0]) == {"step"} | metrics
        final = results["final"][method]
        assert metrics | {"reward_at_kl"} <= set(final)
        assert set(final["reward_at_kl"]) == {"0.25", "0.5", "1.0", "1.5", "2.0"}
        if method.startswith("treg"):  # T-REG's token-reward diagnostic on the held-out pairs
            assert set(final["diagnostics"]) == {"treg/shared_reward", "treg/shared_abs_reward", "treg/diff_reward",
                                                 "treg/diff_abs_reward", "treg/shared_share"}
        else:
            assert "diagnostics" not in final
    _all_finite({k: v for k, v in results.items() if k != "settings"})
    # --replot summarises and plots the JSON again, without training
    _script("po_quality", "--replot", str(tmp_path / "po.json"), "--out", str(tmp_path / "again"))
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["final"] == results["final"] and (tmp_path / "again.png").is_file()


@pytest.mark.slow
def test_ppo_quality(tiny_world, tmp_path):
    """An oracle condition and two on learned rewards (two reward models trained for 1 % of an epoch), one seed,
    2 rollout batches of 4 prompts (about 35 s on 2 cores)."""
    conditions = ("oracle_credit", "token_rm", "discriminator_random")
    _script("ppo_quality", "--conditions", *conditions, "--seeds", "0", "--steps", "2", "--rollout-batch-size", "4",
            "--ppo-epochs", "1", "--micro-batch", "4", "--eval-prompts", "4", "--smooth", "1", "--rm-epochs", "0.01",
            "--rm-batch", "4", "--workers", "1", "--threads", "1", "--world-dir", str(tiny_world),
            "--rm-dir", str(tmp_path / "rms"), "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "ppo"))
    results = json.loads((tmp_path / "ppo.json").read_text())
    assert (tmp_path / "ppo.png").stat().st_size > 0
    assert set(results) == {"settings", "notes", "reward_models", "summary", "runs", "seconds"}
    assert results["notes"] == []
    assert set(results["reward_models"]) == {"token", "discriminator"}
    for info in results["reward_models"].values():
        assert {"accuracy", "auroc", "edit_auroc"} <= set(info["eval"])
    assert set(results["summary"]) == set(results["runs"]) == set(conditions)
    for cond, stats in results["summary"].items():
        for key in ("budget_mean_oracle_reward", "final_oracle_reward", "final_well_formed", "final_kl",
                    "final_training_reward", "final_length", "initial_length", "eval_oracle_reward",
                    "eval_well_formed", "eval_kl"):
            assert len(stats[key]) == 2, (cond, key)  # mean, standard error
        assert stats["samples_to_threshold"]["reached"] in ("0/1", "1/1")
        curve = results["runs"][cond]["0"]["curve"]
        assert len(curve["samples"]) == len(curve["oracle/reward"]) == 2
    _all_finite({k: results[k] for k in ("reward_models", "summary", "seconds")},
                none_allowed=("/samples_to_threshold/per_seed[0]", "/samples_to_threshold/mean_of_reached"))


@pytest.mark.slow
def test_rm_quality(tiny_world, tmp_path):
    """Two reward models, contrastive and implicit DPO token rewards, 4 steps each (about 6 s on 2 cores); then
    --length_bias on the kept runs."""
    out, work = tmp_path / "rm.json", tmp_path / "work"
    _script("rm_quality", "--seeds", "0", "--pair_steps", "4", "--edit_steps", "4", "--dpo_steps", "4",
            "--variants", "sequence", "token", "--threads", "1", "--world_dir", str(tiny_world),
            "--work_dir", str(work), "--out", str(out))
    result = json.loads(out.read_text())
    assert {"settings", "pair_label_agreement", "accuracy", "auroc", "edit_auroc", "edit_accuracy", "seconds",
            "edit_label_lookup_auroc", "notes", "targets", "total_seconds"} <= set(result)
    assert set(result["accuracy"]) == {"sequence", "token"}
    assert set(result["auroc"]) == {"token", "contrastive", "implicit_dpo"}
    assert set(result["edit_auroc"]) == set(result["edit_accuracy"]) == {"token"}
    for summary in (*result["accuracy"].values(), *result["auroc"].values()):
        assert {"mean", "std", "min", "max", "values"} <= set(summary)
    assert set(result["edit_label_lookup_auroc"]) == {"soft", "hard"}
    assert set(result["targets"]) == {"token_auroc"}
    _all_finite(result)
    # the length bias of the runs it kept, without training
    bias = tmp_path / "bias.json"
    _script("rm_quality", "--length_bias", f"token={work / 'token-0'}", f"sequence={work / 'sequence-0' / 'final'}",
            "--world_dir", str(tiny_world), "--threads", "1", "--out", str(bias))
    lengths = json.loads(bias.read_text())
    assert {"n_responses", "oracle", "longer_wins_accuracy", "token", "sequence"} <= set(lengths)
    for name in ("token", "sequence"):
        assert {"pearson", "spearman", "accuracy", "score_per_token"} <= set(lengths[name])
    _all_finite(lengths)
