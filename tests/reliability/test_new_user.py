"""What a new user trips over on their own model and data (a word-level tokenizer without a chat template, a tiny
Llama, their own pairs): each case fails on the behaviour it replaces.

1. contrastive prompting with a template the tokenizer cannot read stops with the fix (not silent noise), and the
   template actually used is what config.yaml records;
2. a control template with ``{prompt}`` inside the instruction, and the template options in ``finegrain eval``;
3. ``eval --judge python:module:function`` (any reward spec), with the function's per-row metrics reported;
4. an empty response is an EOS-only sample; rows count from 1 and the error names --skip_invalid_rows (these are
   tests/data/test_schema.py::test_an_empty_response_is_an_eos_only_sample and ::test_bad_preference_rows);
5. data errors come before any model is loaded;
6. the run prints its non-default options, schedule and clipping when it starts;
7. ``eval --tokenizer_name_or_path`` judges reward models' token credit alone;
8. ``--disable_tqdm`` silences transformers' own progress bars; ``rm --max_credit_samples`` says when it sub-samples.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scale"))
import _runs as R  # noqa: E402
from _runs import one_torch_thread  # noqa: E402,F401 (autouse fixture)

from finegrain.cli.main import main as cli_main  # noqa: E402
from finegrain.errors import DataError  # noqa: E402

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer WITHOUT a chat template, and pairs, prompts, credit rows of its own."""
    root = tmp_path_factory.mktemp("user")
    model = R.tiny_model_dir(root / "model", "llama")
    rows = R.preference_rows(16)
    credit = [{"prompt": r["prompt"], "response": r["chosen"], "labels": [1] * len(r["chosen"].split())}
              for r in rows[:4]]
    credit += [{"prompt": r["prompt"], "response": r["rejected"], "labels": [-1] * len(r["rejected"].split())}
               for r in rows[:4]]
    return {"root": root, "model": model, "pairs": R.write_rows(root / "pairs.jsonl", rows),
            "prompts": R.write_rows(root / "prompts.jsonl", R.prompt_rows(8)),
            "credit": R.write_rows(root / "credit.jsonl", credit)}


def _po(user, out, *extra):
    return ["po", *R.model_args(user["model"], user["pairs"], out, steps=1, batch=2), *map(str, extra)]


def test_1_unreadable_template_stops_with_the_fix_and_the_used_template_is_recorded(user, tmp_path, capsys):
    assert cli_main(_po(user, tmp_path / "auto", "--loss", "treg-dpo")) == 1  # default: the draft form
    err = capsys.readouterr().err
    assert "needs a chat template" in err and "--contrastive_template control" in err
    assert not (tmp_path / "auto").exists()  # refused before anything was written
    assert cli_main(_po(user, tmp_path / "control", "--loss", "treg-dpo", "--contrastive_template", "control",
                        "--contrastive_positive", "tell me {prompt}", "--contrastive_negative", "{prompt} ?")) == 0
    recorded = yaml.safe_load((tmp_path / "control" / "config.yaml").read_text())
    assert (recorded["contrastive_template"], recorded["contrastive_positive"]) == ("control", "tell me {prompt}")


def test_2_eval_takes_the_template_options(user, tmp_path):
    out = tmp_path / "credit"
    args = ["eval", "--token_credit", "oracle-credit", "contrastive", "--reference", str(user["model"]),
            "--credit_data", str(user["credit"]), "--output_dir", str(out)]
    assert cli_main(args) == 1  # the draft default cannot be read by this tokenizer
    assert cli_main([*args, "--contrastive_template", "control", "--contrastive_positive", "tell me {prompt}",
                     "--contrastive_negative", "{prompt} ?"]) == 0
    assert set(json.loads((out / "token_credit.json").read_text())["auroc"]) == {"oracle-credit", "contrastive"}


def judge_with_metrics(prompts, responses):
    """A user's judge: 1 per word, and whether the response is short."""
    return {"scores": [float(len(r.split())) for r in responses], "metrics": {"short": [len(r) < 10 for r in responses]}}


def test_3_eval_judge_takes_any_reward_spec_with_its_metrics(user, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "eval"
    assert cli_main(["eval", "--policy", str(user["model"]), "--reference", str(user["model"]), "--prompts",
                     str(user["prompts"]), "--judge", "python:test_new_user:judge_with_metrics", "--max_new_tokens",
                     "6", "--output_dir", str(out), "--disable_tqdm"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["judge"] == "python:test_new_user:judge_with_metrics"
    assert 0.0 <= result["short_rate"] <= 1.0 and 0.0 <= result["ref_short_rate"] <= 1.0


def test_5_data_errors_come_before_any_model_is_loaded(user, tmp_path, monkeypatch):
    import finegrain.models.loading as loading

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data were checked")

    monkeypatch.setattr(loading, "load_causal_lm", no_model)
    bad = R.write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": None, "rejected": "r"}])
    from finegrain.cli import commands

    for command, argv in [
        ("po", ["--eval_dataset_name", str(tmp_path / "missing.jsonl")]),
        ("po", ["--dataset_name", str(bad)]),
        ("rm", ["--eval_dataset_name", str(tmp_path / "missing.jsonl")]),
        ("sft", ["--dataset_name", str(tmp_path / "missing.jsonl")]),
        ("ppo", ["--dataset_name", str(tmp_path / "missing.jsonl")]),
    ]:
        base = ["--model_name_or_path", str(user["model"]), "--dataset_name", str(user["pairs"]),
                "--output_dir", str(tmp_path / command)]
        with pytest.raises(DataError):
            getattr(commands, command)(base + argv)


def test_6_a_run_prints_its_options_schedule_and_clipping(user, tmp_path, capsys):
    assert cli_main(_po(user, tmp_path / "run", "--loss", "dpo", "--beta", "0.2")) == 0
    err = capsys.readouterr().err
    assert "beta=0.2" in err and "max_steps=1" in err
    assert "learning rate 0.001 with no warm-up, then linear decay to 0; gradient norm clipped at 1" in err


def test_7_eval_judges_reward_models_with_only_a_tokenizer(user, tmp_path):
    rm = tmp_path / "rm"
    assert cli_main(["rm", "--level", "token", "--objective", "token_cls",
                     *R.model_args(user["model"], user["credit"], rm, steps=1, batch=2)]) == 0
    out = tmp_path / "credit"
    assert cli_main(["eval", "--token_credit", str(rm / "final"), "--tokenizer_name_or_path", str(user["model"]),
                     "--credit_data", str(user["credit"]), "--output_dir", str(out)]) == 0
    assert list(json.loads((out / "token_credit.json").read_text())["auroc"]) == ["rm"]


def test_8_quiet_means_quiet_and_sub_sampling_is_said(user, tmp_path, capfd, caplog):
    assert cli_main(["sft", *R.model_args(user["model"], R.write_sft_rows(tmp_path / "sft.jsonl", 8),
                                          tmp_path / "sft", steps=1, batch=2)]) == 0  # model_args has --disable_tqdm
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
    with caplog.at_level(logging.WARNING):
        assert cli_main(["rm", "--level", "token", "--objective", "token_cls", "--credit_dataset_name",
                         str(user["credit"]), "--max_credit_samples", "3",
                         *R.model_args(user["model"], user["credit"], tmp_path / "rm", steps=1, batch=2)]) == 0
    assert any("uses the first 3 of its 8 rows (--max_credit_samples 3)" in r.getMessage() for r in caplog.records)
