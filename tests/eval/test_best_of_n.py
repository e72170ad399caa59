"""Best-of-N in finegrain eval: a selector picks the best of a prompt's first N policy samples, the judge scores it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scale"))
import _runs as R  # noqa: E402
from _runs import one_torch_thread  # noqa: E402,F401 (autouse fixture)

from finegrain.errors import ConfigError  # noqa: E402
from finegrain.eval.cli import best_of_n, evaluate_policy  # noqa: E402


def test_best_of_n_by_hand():
    """Two prompts x 3 samples. Judge [[1, 5, 2], [0, 4, 9]], selector [[0, 1, 3], [2, 2, 1]].
    N=1: the first samples, (1 + 0) / 2. N=2: argmax sel [1, 0 (tie: first)] -> judge 5, 0 -> 2.5.
    N=3: argmax [2, 0] -> 2, 0 -> 1.0."""
    judge = [1.0, 5.0, 2.0, 0.0, 4.0, 9.0]
    sel = [0.0, 1.0, 3.0, 2.0, 2.0, 1.0]
    assert best_of_n(judge, sel, 3, (1, 2, 3, 4)) == {"1": 0.5, "2": 2.5, "3": 1.0}  # N=4 > 3 samples: left out
    assert best_of_n(judge, judge, 3, (1, 2, 3)) == {"1": 0.5, "2": 4.5, "3": 7.0}  # the judge as its own selector: maxima


def words(prompts, responses):
    return [float(len(r.split())) for r in responses]


def negative_words(prompts, responses):
    return [-float(len(r.split())) for r in responses]


@pytest.mark.smoke
def test_eval_reports_best_of_n_matching_its_samples(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    model = R.tiny_model_dir(tmp_path / "model", "llama")
    prompts = R.write_rows(tmp_path / "prompts.jsonl", R.prompt_rows(6))
    result = evaluate_policy(model, model, prompts=str(prompts), judge="python:test_best_of_n:words", num_samples=4,
                             max_new_tokens=8, output_dir=tmp_path / "out",
                             best_of=["self=python:test_best_of_n:words", "python:test_best_of_n:negative_words"],
                             best_of_sizes=(1, 2, 4))
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    scores = np.array([r["reward"] for r in rows]).reshape(6, 4)
    want_self = {str(n): float(scores[:, :n].max(axis=1).mean()) for n in (1, 2, 4)}
    want_neg = {str(n): float(scores[np.arange(6), scores[:, :n].argmin(axis=1)].mean()) for n in (1, 2, 4)}
    assert result["best_of_n"]["self"] == pytest.approx(want_self)
    assert result["best_of_n"]["python:test_best_of_n:negative_words"] == pytest.approx(want_neg)
    assert want_self["4"] >= want_self["2"] >= want_self["1"] >= want_neg["4"]
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["best_of_n"]["self"] == pytest.approx(want_self)
    with pytest.raises(ConfigError, match="--num_samples 16"):
        evaluate_policy(model, model, prompts=str(prompts), judge="python:test_best_of_n:words", num_samples=4,
                        best_of=["python:test_best_of_n:words"])
