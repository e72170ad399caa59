"""The task's reward kind ``ifeval[:score|pass|credit]`` (finegrain.ifeval.sources) through the reward registry.

Every expected value is derived by hand in the docstrings from the text, its tokens (asserted first) and the
instructions; none is computed by the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("if_verifiable", reason="needs finegrain[ifeval] (if-verifiable, Python >= 3.11)")

from finegrain.errors import ConfigError, DataError  # noqa: E402
from finegrain.ifeval.sources import register  # noqa: E402
from finegrain.rewards.base import row_metrics, sequence_scores  # noqa: E402
from finegrain.rewards.registry import SourceContext, reward_source  # noqa: E402
from finegrain.types import CompletionBatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from _tiny_tokenizers import CHATML, bpe_tokenizer  # noqa: E402

register()
TOK = bpe_tokenizer(CHATML)
EOS = TOK.eos_token_id

# prompt A: no commas, at least 4 words, keyword "cat" (K = 3)
PROMPT_A = [{"role": "user", "content": 'Tell me about cats.\n\nDo not use any commas in your response. Answer with at '
                                        'least 4 words. Include the word "cat" in your response.'}]
# prompt B: lowercase, forbidden "mat", at least 3 words, keyword "cat" (K = 4)
PROMPT_B = ("Tell me about mats. Your entire response should be in English, and in all lowercase letters. No capital "
            'letters are allowed. Do not include the words "mat" in your response. Answer with at least 3 words. '
            'Include the word "cat" in your response.')
# prompt C: no commas, at least 5 words, keyword "dog" (K = 3)
PROMPT_C = 'Tell me about dogs. Do not use any commas in your response. Answer with at least 5 words. Include the ' \
           'word "dog" in your response.'


def tokens(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def batch(prompts, responses, *, eos=True, with_texts=True):
    """A batch whose response block is each response's tokens (+ EOS), right-padded."""
    ids = [tokens(r) + ([EOS] if eos else []) for r in responses]
    width = max(len(x) for x in ids)
    comp = torch.full((len(ids), width), TOK.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.bool)
    for i, x in enumerate(ids):
        comp[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = True
    n = len(ids)
    return CompletionBatch(prompt_input_ids=torch.zeros((n, 1), dtype=torch.long),
                           prompt_attention_mask=torch.ones((n, 1), dtype=torch.long), completion_input_ids=comp,
                           completion_mask=mask, prompts=list(prompts),
                           responses=list(responses) if with_texts else None)


def source(spec):
    return reward_source(spec, SourceContext(tokenizer=TOK))


def values(rewards, row):
    return [round(v, 6) for v in rewards.values[row][rewards.mask[row]].tolist()]


def test_the_tokens_the_hand_derivations_use():
    assert [TOK.decode([i]) for i in tokens("the mat, the cat, the dog")] == \
        ["the", " mat", ",", " the", " cat", ",", " the", " ", "d", "o", "g"]
    assert [TOK.decode([i]) for i in tokens("the cat sat, the Mat.")] == \
        ["the", " cat", " sat", ",", " the", " ", "M", "at", "."]
    assert [TOK.decode([i]) for i in tokens("the cat sat")] == ["the", " cat", " sat"]


def test_score_pass_and_credit_by_hand():
    """Row 0, prompt A, 'the mat, the cat, the dog' (11 tokens + EOS): 6 words >= 4, 'cat' present, commas at
    tokens 2 and 5 -> followed 2 of 3: score 2/3, pass 0; credit: the failed no_comma's 1/3 spread over its 2
    violating tokens, -1/6 each, and 1 on EOS (no failure without a located token): sum 2/3.

    Row 1, prompt B, 'the cat sat, the Mat.' (9 tokens + EOS): 'M' (char 17, token 6) breaks lowercase; 'Mat'
    (chars 17-20, tokens 6 'M' and 7 'at') is the forbidden word; 5 words >= 3 and 'cat' present -> 2 of 4: score
    1/2, pass 0; credit: token 6 gets -1/4 (lowercase, 1 token) - 1/8 (forbidden, 2 tokens) = -0.375, token 7
    -0.125, EOS 1: sum 1/2. The comma is no violation here (no no_comma instruction).

    Row 2, prompt C, 'the cat sat' (3 tokens + EOS): no comma, 3 words < 5, no 'dog' -> 1 of 3: score 1/3; both
    failures are content instructions without token truth, so EOS gets 1 - 2/3 = 1/3, the rest 0."""
    b = batch([PROMPT_A, PROMPT_B, PROMPT_C], ["the mat, the cat, the dog", "the cat sat, the Mat.", "the cat sat"])
    score, passed, credit = source("ifeval").token_rewards(b), source("ifeval:pass").token_rewards(b), \
        source("ifeval:credit").token_rewards(b)
    third = round(1 / 3, 6)
    assert sequence_scores(score).tolist() == pytest.approx([2 / 3, 0.5, 1 / 3])
    assert values(score, 0) == [0.0] * 11 + [round(2 / 3, 6)]
    assert values(score, 2) == [0.0, 0.0, 0.0, third]
    assert sequence_scores(passed).tolist() == [0.0, 0.0, 0.0] and passed.values.abs().sum() == 0
    assert values(credit, 0) == [0, 0, round(-1 / 6, 6), 0, 0, round(-1 / 6, 6), 0, 0, 0, 0, 0, 1.0]
    assert values(credit, 1) == [0, 0, 0, 0, 0, 0, -0.375, -0.125, 0, 1.0]
    assert values(credit, 2) == [0, 0, 0, third]
    # the credit's return is the score of every row; its judgement is the score mode's
    assert credit.values.sum(dim=1).tolist() == pytest.approx([2 / 3, 0.5, 1 / 3], abs=1e-6)
    assert sequence_scores(credit).tolist() == pytest.approx([2 / 3, 0.5, 1 / 3])
    for r in (score, passed, credit):
        assert (r.values[~r.mask] == 0).all() and r.mask.equal(b.completion_mask)
        metrics = row_metrics(r)
        assert metrics["prompt_strict"].tolist() == [0.0, 0.0, 0.0]
        assert metrics["instruction_strict"].tolist() == pytest.approx([2 / 3, 0.5, 1 / 3])
    assert credit.meta["responses"][1] == "the cat sat, the Mat."
    assert [source(s).name for s in ("ifeval", "ifeval:score", "ifeval:pass", "ifeval:credit", "judge=ifeval:pass")] \
        == ["ifeval", "ifeval", "ifeval_pass", "ifeval_credit", "judge"]
    assert source("ifeval:credit").dense and not source("ifeval:pass").dense


def test_a_followed_prompt_and_the_loose_metrics():
    """Prompt A, 'the cat sat on the mat today' (no EOS: cut at max_new_tokens): 7 words, 'cat', no comma -> 3/3:
    score 1, pass 1, credit 1 on the last text token. 'Sure, here:\\nthe cat sat on a mat' fails no_comma strictly
    (the comma is in line 1) but follows every instruction loosely (IFEval drops the first line: 'the cat sat on a
    mat', 6 words): prompt_strict 0, prompt_loose 1, instruction_loose 1; credit -1/3 on the comma token."""
    b = batch([PROMPT_A, PROMPT_A], ["the cat sat on the mat today", "Sure, here:\nthe cat sat on a mat"], eos=False)
    passed, credit = source("ifeval:pass").token_rewards(b), source("ifeval:credit").token_rewards(b)
    assert sequence_scores(passed).tolist() == [1.0, 0.0]
    n0 = int(b.completion_mask[0].sum())
    assert values(passed, 0) == [0.0] * (n0 - 1) + [1.0] and values(credit, 0) == values(passed, 0)
    metrics = row_metrics(passed)
    assert metrics["prompt_strict"].tolist() == [1.0, 0.0] and metrics["prompt_loose"].tolist() == [1.0, 1.0]
    assert metrics["instruction_loose"].tolist() == [1.0, 1.0]
    pieces = [TOK.decode([i]) for i in tokens("Sure, here:\nthe cat sat on a mat")]
    comma = pieces.index(",")
    expected = [0.0] * len(pieces)
    expected[comma] = round(-1 / 3, 6)
    expected[-1] += 1.0
    assert values(credit, 1) == expected


def test_texts_are_decoded_when_the_batch_has_none():
    """Without batch.responses the source decodes the response block (special tokens dropped): same rewards."""
    texts = ["the mat, the cat, the dog", "the cat sat"]
    with_texts = source("ifeval:credit").token_rewards(batch([PROMPT_A, PROMPT_C], texts))
    decoded = source("ifeval:credit").token_rewards(batch([PROMPT_A, PROMPT_C], texts, with_texts=False))
    assert torch.equal(with_texts.values, decoded.values) and decoded.meta["responses"] == texts


def test_bad_specs_and_prompts_are_refused():
    with pytest.raises(ConfigError, match="ifeval:pass"):
        source("ifeval:nope")
    with pytest.raises(DataError, match="row 2.*IFEval task's prompts only"):
        source("ifeval").token_rewards(batch([PROMPT_A, "just chat with me"], ["hi", "hi"]))


def test_registration_is_cheap():
    """Registering imports neither the checkers nor transformers."""
    code = ("import sys; from finegrain.ifeval.sources import register; register(); "
            "from finegrain.rewards.registry import registered_sources; "
            "print('ifeval' in registered_sources(), 'if_verifiable' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False"]


def test_the_command_line_registers_the_kind():
    from finegrain.cli.commands import command_config
    from finegrain.eval.cli import EvalConfig
    from finegrain.rewards.registry import _REGISTRY

    _REGISTRY.pop("ifeval", None)
    command_config("eval", EvalConfig, ["--policy", "p", "--prompts", "x.jsonl", "--reference", "r", "--judge",
                                        "ifeval"])
    assert "ifeval" in _REGISTRY


def _prompt_rows(path: Path) -> list[dict]:
    """Four IFEval task prompts (A, B, C and A again) as the task writes them."""
    from finegrain.ifeval.instructions import parse_instructions
    from finegrain.ifeval.score import prompt_content

    rows = []
    for i, p in enumerate([PROMPT_A, [{"role": "user", "content": PROMPT_B}], [{"role": "user", "content": PROMPT_C}],
                           PROMPT_A]):
        ids, kwargs = parse_instructions(prompt_content(p))
        rows.append({"key": i, "prompt": p, "instruction_id_list": ids, "kwargs": kwargs})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_finegrain_eval_with_the_ifeval_judge_on_a_tiny_model(tmp_path):
    """`finegrain eval --judge ifeval` on a tiny random model: eval.json has the judge's rates, and they are the
    means of IFEval's own verdicts on the responses written to samples.jsonl."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scale"))
    from _runs import tiny_model_dir

    from finegrain.cli.commands import eval_command
    from finegrain.ifeval.score import score_responses

    model = tiny_model_dir(tmp_path / "tiny", "qwen2", chat=True)
    rows = _prompt_rows(tmp_path / "prompts.jsonl")
    out = tmp_path / "eval"
    assert eval_command(["--policy", str(model), "--reference", str(model), "--prompts", str(tmp_path / "prompts.jsonl"),
                         "--judge", "ifeval", "--temperature", "0", "--max_new_tokens", "6", "--output_dir", str(out),
                         "--disable_tqdm"]) == 0
    result = json.loads((out / "eval.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    scores = score_responses(rows, [s["response"] for s in samples])
    assert result["judge"] == "ifeval" and result["num_prompts"] == 4
    assert result["prompt_strict_rate"] == pytest.approx(scores.prompt_strict)
    assert result["prompt_loose_rate"] == pytest.approx(scores.prompt_loose)
    per_row = [sum(f) / len(f) for f in scores.followed_strict]
    assert result["instruction_strict_rate"] == pytest.approx(sum(per_row) / 4)
    assert result["mean_reward"] == pytest.approx(sum(per_row) / 4)
    assert result["seq_kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is its own reference
