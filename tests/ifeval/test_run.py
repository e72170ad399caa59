"""``finegrain ifeval run`` (finegrain.ifeval.run, .results): the plan, resumption, refused settings, the table.

The default tier checks the plan and the bookkeeping without training anything; the slow test runs the quick
setting end to end on a tiny random model standing in for SmolLM2 (every method, eval, token credit, report).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("if_verifiable", reason="needs finegrain[ifeval] (if-verifiable, Python >= 3.11)")

from finegrain.errors import ConfigError  # noqa: E402
from finegrain.ifeval import run as ifeval_run  # noqa: E402
from finegrain.ifeval.results import format_results, write_results  # noqa: E402


def _cfg(tmp_path, *argv):
    from finegrain.config import parse

    return parse(ifeval_run.RunConfig, ["--run_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache"),
                                        *argv], prog="test")


def test_the_plan_runs_every_method_as_a_normal_command(tmp_path):
    paths, jobs = ifeval_run.plan(_cfg(tmp_path))
    assert [j.method for j in jobs] == list(ifeval_run.METHODS)
    by = {j.method: j for j in jobs}
    assert by["dpo"].argv[-2:] == ["--loss", "dpo"] and "--use_peft" in by["dpo"].argv
    treg = by["treg"].argv
    assert treg[treg.index("--loss"):treg.index("--loss") + 4] == ["--loss", "treg-dpo", "--contrastive_template", "draft"]
    # a method's own flags come after the preset's, so they win: dpo-rev-sft trains 3 epochs, the others 1
    sft = by["dpo-rev-sft"].argv
    assert sft[-6:] == ["--loss", "dpo", "--rpo_alpha", "1.0", "--num_train_epochs", "3"]
    assert sft.count("--num_train_epochs") == 2 and by["dpo-rev"].argv.count("--num_train_epochs") == 1
    from finegrain.config import parse
    from finegrain.trainers.po import POConfig

    assert parse(POConfig, sft[1:], prog="po").num_train_epochs == 3
    assert by["tdpo2-rev"].argv[by["tdpo2-rev"].argv.index("--dataset_name") + 1].endswith("data/revision_pairs.jsonl")
    assert by["rm-token"].argv[:3] == ["rm", "--level", "token"]
    assert by["rm-token"].argv[by["rm-token"].argv.index("--dataset_name") + 1].endswith("data/revisions.jsonl")
    assert by["rm-sentence"].argv[by["rm-sentence"].argv.index("--dataset_name") + 1].endswith("data/pairs.jsonl")
    assert by["ppo-credit"].argv[:3] == ["ppo", "--reward", "ifeval:credit"]
    assert by["ppo-rm-discriminator"].argv[2] == str(paths.root / "rm-discriminator" / "final")
    assert all(j.argv[j.argv.index("--output_dir") + 1] == str(j.out) for j in jobs)
    assert all(j.argv[j.argv.index("--model_name_or_path") + 1] == str(paths.model) for j in jobs)
    assert paths.task == tmp_path / "cache" / "ifeval" and paths.model == tmp_path / "cache" / "models" / \
        "SmolLM2-135M-Instruct"
    # a subset brings the reward model its PPO run needs; later seeds get their own directories
    _, jobs = ifeval_run.plan(_cfg(tmp_path, "--methods", "ppo-rm-token", "--seeds", "0", "3", "--quick"))
    assert [j.out.name for j in jobs] == ["rm-token", "ppo-rm-token", "rm-token-seed3", "ppo-rm-token-seed3"]
    assert jobs[3].argv[2].endswith("rm-token-seed3/final") and jobs[3].argv[jobs[3].argv.index("--seed") + 1] == "3"
    assert jobs[0].argv[jobs[0].argv.index("--max_steps") + 1] == "2"  # the quick preset
    with pytest.raises(ConfigError, match="unknown method"):
        _cfg(tmp_path, "--methods", "grpo")
    with pytest.raises(ConfigError, match="option 'threads' must be > 0, got 0"):
        _cfg(tmp_path, "--threads", "0")


def test_resume_flags_follow_the_run_directory(tmp_path):
    run = tmp_path / "dpo"
    assert ifeval_run._resume_flags(run) == []
    run.mkdir()
    assert ifeval_run._resume_flags(run) == ["--overwrite_output_dir"]  # started, nothing to resume from
    (run / "checkpoints" / "step-000005").mkdir(parents=True)
    assert ifeval_run._resume_flags(run) == ["--resume_from_checkpoint", "latest"]
    assert not ifeval_run._is_done(run)
    (run / "final").mkdir()
    (run / "run.json").write_text(json.dumps({"status": "completed"}))
    assert ifeval_run._is_done(run)


def test_other_settings_in_the_same_directory_are_refused(tmp_path):
    cfg = _cfg(tmp_path, "--quick")
    paths, _ = ifeval_run.plan(cfg)
    ifeval_run.check_settings(paths, cfg)
    ifeval_run.check_settings(paths, cfg)  # the same settings again: fine
    full = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="quick there, full now"):
        ifeval_run.check_settings(ifeval_run.plan(full)[0], full)


def test_a_new_method_joins_a_run_directory_and_changed_flags_are_refused(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    paths, _ = ifeval_run.plan(cfg)
    saved = paths.root / "settings.json"
    monkeypatch.delitem(ifeval_run.PO_METHODS, "dpo-rev-sft")
    ifeval_run.check_settings(paths, cfg)  # a directory made before dpo-rev-sft existed
    assert "dpo-rev-sft" not in json.loads(saved.read_text())["methods"]["po"]
    monkeypatch.undo()
    ifeval_run.check_settings(paths, cfg)  # the new method is added to the record
    assert json.loads(saved.read_text())["methods"]["po"]["dpo-rev-sft"][-1] == "3"
    monkeypatch.setitem(ifeval_run.PO_METHODS, "dpo", ["--loss", "dpo", "--beta", "0.5"])
    with pytest.raises(ConfigError, match="dpo's flags differ"):
        ifeval_run.check_settings(paths, cfg)


def test_credit_and_report_cover_finished_methods_left_out_of_methods(tmp_path, capsys):
    from finegrain.ifeval.cli import main

    argv = ["run", "--dry_run", "--quick", "--run_dir", str(tmp_path / "r"), "--cache_dir", str(tmp_path)]
    done = tmp_path / "r" / "dpo"
    (done / "final").mkdir(parents=True)
    (done / "run.json").write_text(json.dumps({"status": "completed"}))
    (tmp_path / "r" / "tdpo2").mkdir()  # started, not finished: left out
    task = tmp_path / "ifeval-quick"
    (task / "prompts").mkdir(parents=True)
    (task / "task.json").write_text(json.dumps({"dtype": "float32"}))
    (task / "prompts" / "test.jsonl").write_text(json.dumps(
        {"prompt": [{"role": "user", "content": "Write. Do not use any commas in your response."}],
         "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}) + "\n")
    assert main([*argv, "--methods", "rm-token"]) == 0
    out = capsys.readouterr().out
    assert out.count("[train] ") == 1
    assert "[eval] dpo: 1 test prompts" in out and "[eval] tdpo2" not in out
    credit = next(line for line in out.splitlines() if line.startswith("[credit]"))
    report = next(line for line in out.splitlines() if line.startswith("[report]"))
    assert f"implicit_dpo=implicit:{done / 'final'}" in credit and "implicit_tdpo2" not in credit
    assert str(done) in report.split() and str(tmp_path / "r" / "tdpo2") not in report.split()


def test_dry_run_prints_the_commands(tmp_path, capsys):
    from finegrain.ifeval.cli import main

    assert main(["run", "--dry_run", "--quick", "--run_dir", str(tmp_path / "r"), "--cache_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[task] finegrain ifeval build" in out and "--num_train_prompts 32" in out
    assert out.count("[train] ") == len(ifeval_run.METHODS) and "[credit] finegrain eval --token_credit" in out
    assert not (tmp_path / "r").exists()


def _eval(prompt, instr, kl, words):
    return {"n": 4, "prompt_strict": prompt, "instruction_strict": instr, "prompt_loose": prompt, "instruction_loose":
            instr, "kl": kl, "mean_words": words, "mean_tokens": words * 1.25, "truncated": 0.5,
            "per_instruction": {"punctuation:no_comma": {"strict": 0.5, "loose": 0.5, "count": 2}}}


def test_results_table(tmp_path):
    root = tmp_path / "run"
    for name, ev in (("start", _eval(0.25, 0.5, 0.0, 80.0)), ("dpo", _eval(0.5, 0.75, 1.234, 60.0))):
        (root / name).mkdir(parents=True)
        (root / name / "eval.json").write_text(json.dumps(ev))
    (root / "rm-token" / "final").mkdir(parents=True)
    (root / "token-credit").mkdir()
    (root / "token-credit" / "token_credit.json").write_text(json.dumps(
        {"auroc": {"truth": 1.0, "contrastive": 0.5}, "precision_at_k": {"truth": 1.0, "contrastive": 0.25},
         "num_responses": 4, "n_pos": 30, "n_neg": 10, "n_neutral": 2}))
    (root / "times.json").write_text(json.dumps({"dpo": 90.0, "rm-token": 30.0}))
    table = write_results(root, [root / "dpo", root / "rm-token"], setting="quick")
    assert "| start | 0.250 | 0.500 | 0.250 | 0.00 | 80.0 | 100.0 | 0.50 | – | – | – | – | – | – |" in table
    assert "| dpo | 0.500 | 0.750 | 0.500 | 1.23 | 60.0 | 75.0 | 0.50 | – | – | – | – | – | 1.5 min |" in table
    assert "| contrastive | 0.500 | 0.250 |" in table and "10 violating, 30 clean" in table
    assert "rm-token 30 s" in table and "in all: 2.0 min" in table
    saved = json.loads((root / "results.json").read_text())
    assert [r["method"] for r in saved["policies"]] == ["start", "dpo"]
    assert format_results(saved, "quick") == table


@pytest.mark.slow
def test_quick_setting_end_to_end_on_a_tiny_model(tmp_path):
    """Every stage of the quick setting with a tiny random Llama in place of SmolLM2 (the conversion marker says it
    is the converted model): a policy row per trained method, token credit of every source, the report."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from _tiny_tokenizers import CHATML, bpe_tokenizer

    from finegrain.ifeval.model import GGUF_SHA256, model_dir
    from finegrain.models.build import causal_lm_from_config, tiny_llama_config
    from finegrain.models.gguf import GGUF_MARKER

    tok = bpe_tokenizer(CHATML)
    target = model_dir(tmp_path / "cache")
    cfg = tiny_llama_config(len(tok), hidden_size=32, num_heads=4, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    causal_lm_from_config(cfg, seed=1).save_pretrained(target)
    tok.save_pretrained(target)
    (target / GGUF_MARKER).write_text(json.dumps({"sha256": GGUF_SHA256}))
    argv = ["run", "--quick", "--run_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache")]
    from finegrain.ifeval.cli import main

    assert main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    methods = [r["method"] for r in results["policies"]]
    assert methods == ["start", "dpo", "tdpo2", "treg", "dpo-rev", "tdpo2-rev", "dpo-rev-sft", "ppo-pass", "ppo-credit", "ppo-rm-sequence", "ppo-rm-sentence",
                       "ppo-rm-token", "ppo-rm-discriminator"]
    # every source is scored (a random tiny model's responses may hold no violation: then AUROC is undefined)
    assert [s["source"] for s in results["token_credit"]] == [
        "exact_truth", "ifeval_credit", "contrastive", "implicit_dpo", "implicit_tdpo2", "implicit_treg",
        "implicit_dpo_rev", "implicit_tdpo2_rev", "implicit_dpo_rev_sft", "sequence_rm",
        "sentence_rm", "token_rm", "discriminator_rm"]
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000
    # a second run skips everything; other settings in the same directory are refused
    times = (tmp_path / "run" / "times.json").read_text()
    assert main(argv) == 0
    assert json.loads((tmp_path / "run" / "times.json").read_text()).keys() == json.loads(times).keys()
    with pytest.raises(ConfigError, match="other settings"):
        main(argv[:1] + argv[2:])


def test_two_runs_on_one_directory_keep_each_others_times(tmp_path):
    path = tmp_path / "times.json"
    a, b = ifeval_run.Clock(path), ifeval_run.Clock(path)  # both started before either recorded anything
    a.record("dpo", 10.04)
    b.record("ppo-pass", 20.0)
    a.record("eval/dpo", 3.0)
    assert json.loads(path.read_text()) == {"dpo": 10.0, "ppo-pass": 20.0, "eval/dpo": 3.0}
    b.record("dpo", 12.0)  # a stage run again: its new time
    assert json.loads(path.read_text())["dpo"] == 12.0 and not list(tmp_path.glob(".times.json.*"))


def test_unasked_rates_in_the_table_and_old_evaluations_rescored(tmp_path):
    from finegrain.ifeval.evaluate import rescore

    rows = [{"prompt": [{"role": "user", "content": "Write about the sea. Do not use any commas in your response."}],
             "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
            {"prompt": [{"role": "user", "content": "Write about the sea. Include the word \"sea\"."}],
             "instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": ["sea"]}]}]
    texts = ["the sea is calm today and the boats are out on the water",
             "we walked along the sea wall and watched the birds over the harbour"]
    refs = ["The sea, calm today, holds the boats.", "The Sea Wall, where we walked, is long."]
    root = tmp_path / "run"
    for name in ("start", "dpo"):
        out = root / name
        out.mkdir(parents=True)
        with (out / "samples.jsonl").open("w") as f:
            for row, text, ref in zip(rows, texts, refs):
                f.write(json.dumps({"prompt": row["prompt"], "response": text, "ref_response": ref, "length": 12,
                                    "ref_length": 9, "truncated": False, "ref_truncated": False}) + "\n")
        old = _eval(0.5, 0.5, 0.0, 12.0)  # an eval.json from before the unasked key existed
        (out / "eval.json").write_text(json.dumps(old))
        assert "unasked" not in old
        new = rescore(out, rows)
        assert new["kl"] == old["kl"] and new["unasked"]["punctuation:no_comma"] == {"rate": 1.0, "count": 1}
        assert new["unasked"]["change_case:english_lowercase"] == {"rate": 1.0, "count": 2}
        assert new["reference_ifeval"]["unasked"]["punctuation:no_comma"] == {"rate": 0.0, "count": 1}
        assert json.loads((out / "eval.json").read_text()) == new
    table = write_results(root, [root / "dpo"])
    assert "| method | no comma, unasked | lowercase, unasked | capitals, unasked |" in table
    assert "| dpo | 1.00 | 1.00 | 0.00 |" in table
