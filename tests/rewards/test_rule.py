"""Rule reward sources: the world's oracle (sequence score and per-word credit) and user functions."""

import dataclasses
import math
import textwrap

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from finegrain.errors import ConfigError, DataError, NonFiniteError
from finegrain.rewards import RewardSource
from finegrain.rewards.rule import FunctionRewardSource, load_function, word_end_tokens
from finegrain.types import CompletionBatch
from finegrain.world.sources import OracleRewardSource
from finegrain.world.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def batch_of(tok, prompts, responses, eos=None):
    """A CompletionBatch: left-padded prompts, right-padded responses (+ EOS unless ``eos[i]`` is False)."""
    eos = eos or [True] * len(responses)
    p_ids = [tok(p)["input_ids"] for p in prompts]
    r_ids = [tok(r, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if e else []) for r, e in zip(responses, eos)]
    P, T = max(map(len, p_ids)), max(map(len, r_ids))
    pid = torch.tensor([[0] * (P - len(p)) + p for p in p_ids])
    pat = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in p_ids])
    rid = torch.tensor([r + [0] * (T - len(r)) for r in r_ids])
    mask = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in r_ids])
    return CompletionBatch(pid, pat, rid, mask, extras={"truncated": torch.tensor([not e for e in eos])})


PROMPTS = ["describe the river .", "tell me about the castle ."]
RESPONSES = ["it flows gently . it is dry .", "it is"]


def test_oracle_sequence_score_on_the_last_token(tok):
    """River: flows fits (+1, style 0), gently is style +0.5, dry clashes (−1): score 0.5, on EOS (index 8).
    Castle: "it is" is malformed: penalty −1 over its 2 words, score −1, on EOS (index 2)."""
    batch = batch_of(tok, PROMPTS, RESPONSES)
    src = OracleRewardSource(tok)
    out = src.token_rewards(batch)
    expected = torch.zeros(2, 9)
    expected[0, 8], expected[1, 2] = 0.5, -1.0
    assert torch.equal(out.values, expected)
    assert out.meta["score"].tolist() == [0.5, -1.0]
    assert out.meta["metrics"]["well_formed"].tolist() == [True, False]
    assert out.meta["responses"] == RESPONSES
    assert torch.equal(out.mask, batch.completion_mask)
    assert isinstance(src, RewardSource) and src.name == "oracle"


def test_oracle_credit_on_the_token_that_ends_each_word(tok):
    """Word-level tokenizer: token i = word i; the EOS token gets 0; padding gets 0."""
    out = OracleRewardSource(tok, dense=True).token_rewards(batch_of(tok, PROMPTS, RESPONSES))
    #           it  flows gently  .   it  is  dry   .  EOS
    row0 = [0.0, 1.0, 0.5, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0]
    row1 = [-0.5, -0.5, 0.0] + [0.0] * 6
    assert out.values.tolist() == [row0, row1]
    assert out.values.sum(1).tolist() == out.meta["score"].tolist()  # credit decomposes the score
    assert OracleRewardSource(tok, dense=True).name == "oracle_credit"


def test_oracle_on_a_truncated_response_scores_its_last_token(tok):
    out = OracleRewardSource(tok).token_rewards(batch_of(tok, PROMPTS[:1], ["it flows gently"], eos=[False]))
    assert out.values.tolist() == [[0.0, 0.0, -1.0]]  # a trailing fragment is malformed: score −1, on "gently"


def test_oracle_uses_given_prompts_and_conversations(tok):
    batch = batch_of(tok, ["describe the castle ."], ["it is dry ."])  # decoded prompt: castle, dry: 0
    src = OracleRewardSource(tok)
    assert src.token_rewards(batch).meta["score"].tolist() == [0.0]
    given = [[{"role": "user", "content": "describe the river ."}]]  # the batch's raw prompt wins
    assert src.token_rewards(dataclasses.replace(batch, prompts=given)).meta["score"].tolist() == [-1.0]


def test_oracle_rejects_prompts_outside_the_world(tok):
    batch = batch_of(tok, ["describe the river ."], ["it flows ."])
    with pytest.raises(DataError, match="'oracle' judges world prompts only"):
        OracleRewardSource(tok).token_rewards(dataclasses.replace(batch, prompts=["what is two plus two"]))


def _wordpiece_tokenizer():
    vocab = ["[PAD]", "[EOS]", "it", "flo", "##ws", "gent", "##ly", "."]
    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]")


def test_word_end_tokens_with_subword_pieces():
    """"it flo ##ws gent ##ly ." + EOS: words end on tokens 0, 2, 4, 5; EOS (6) gets none."""
    tok = _wordpiece_tokenizer()
    ids = tok("it flows gently .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(ids) == ["it", "flo", "##ws", "gent", "##ly", ".", "[EOS]"]
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == "it flows gently ."
    assert word_end_tokens(tok, ids, text) == [0, 2, 4, 5]
    assert word_end_tokens(tok, ids, "") == []


def test_word_end_tokens_identity_for_word_level(tok):
    ids = tok("it flows .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert word_end_tokens(tok, ids, "it flows .") == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ functions


def n_words(prompts, responses):
    return [float(len(r.split())) for r in responses]


def test_function_sequence_scores_on_the_last_token(tok):
    batch = batch_of(tok, PROMPTS, RESPONSES)
    src = FunctionRewardSource(n_words, tok)
    out = src.token_rewards(batch)
    assert src.name == "n_words" and isinstance(src, RewardSource)
    expected = torch.zeros(2, 9)
    expected[0, 8], expected[1, 2] = 8.0, 2.0
    assert torch.equal(out.values, expected)


def test_function_token_rewards_with_and_without_eos(tok):
    batch = batch_of(tok, PROMPTS, RESPONSES)  # 9 and 3 tokens with EOS

    def per_token(prompts, responses):
        return [list(range(1, 9)), torch.tensor([1.0, 2.0, 3.0])]  # row 0 without EOS, row 1 with it

    out = FunctionRewardSource(per_token, tok).token_rewards(batch)
    assert out.values.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 0], [1, 2, 3, 0, 0, 0, 0, 0, 0]]


def test_function_mixed_rows_and_prompts_passed_through(tok):
    seen = {}

    def fn(prompts, responses):
        seen["prompts"] = prompts
        return [0.5, [1.0, 1.0]]

    batch = dataclasses.replace(batch_of(tok, PROMPTS, RESPONSES), prompts=["a", "b"], responses=["x", "y z"])
    out = FunctionRewardSource(fn, tok).token_rewards(batch)
    assert seen["prompts"] == ["a", "b"]
    assert out.values[0].tolist() == [0.0] * 8 + [0.5] and out.values[1].tolist() == [1.0, 1.0] + [0.0] * 7


def test_function_metrics_are_reported_per_row(tok):
    """A function may return {"scores": [...], "metrics": {name: [...]}}: the metrics go to meta["metrics"]."""
    src = FunctionRewardSource(lambda p, r: {"scores": [1.0, 2.0], "metrics": {"short": [len(x) < 6 for x in r]}}, tok)
    out = src.token_rewards(batch_of(tok, PROMPTS, RESPONSES))
    assert out.meta["metrics"]["short"].tolist() == [0.0, 1.0]
    assert out.values.sum(1).tolist() == [1.0, 2.0]
    with pytest.raises(DataError, match="metric 'short' has 1 values for 2"):
        FunctionRewardSource(lambda p, r: {"scores": [1.0, 2.0], "metrics": {"short": [1]}}, tok).token_rewards(
            batch_of(tok, PROMPTS, RESPONSES))


@pytest.mark.parametrize("result, match", [
    ([1.0], "returned 1 items for 2 responses"),
    ("abc", "must return a list"),
    ([[1.0] * 5, 0.0], "row 0: 5 token rewards for a response of 9 tokens"),
    ([0.0, "x"], "row 1: expected a number"),
])
def test_function_bad_output_names_the_function(tok, result, match):
    src = FunctionRewardSource(lambda p, r: result, tok, name="judge")
    with pytest.raises(DataError, match=rf"reward function 'judge'.*{match}"):
        src.token_rewards(batch_of(tok, PROMPTS, RESPONSES))


def test_truncated_row_needs_a_value_per_token(tok):
    batch = batch_of(tok, PROMPTS[:1], ["it flows"], eos=[False])
    with pytest.raises(DataError, match="1 token rewards for a response of 2 tokens"):
        FunctionRewardSource(lambda p, r: [[1.0]], tok).token_rewards(batch)


@pytest.mark.parametrize("result", [[math.nan, 0.0], [0.0, [1.0, math.inf]]])
def test_non_finite_function_rewards_name_the_source(tok, result):
    src = FunctionRewardSource(lambda p, r: result, tok, name="my_fn")
    with pytest.raises(NonFiniteError, match="'my_fn'"):
        src.token_rewards(batch_of(tok, PROMPTS, RESPONSES))


def test_load_function_by_import_never_eval(tmp_path, monkeypatch, tok):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        class Judge:
            @staticmethod
            def length(prompts, responses):
                return [float(len(r)) for r in responses]
        def nothing(prompts, responses):
            return [0.0 for _ in responses]
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    src = FunctionRewardSource.from_spec("python:my_rewards:Judge.length", tok)
    assert src.name == "length"
    assert src.token_rewards(batch_of(tok, PROMPTS, RESPONSES)).values.sum(1).tolist() == [29.0, 5.0]
    assert load_function("my_rewards:nothing").__name__ == "nothing"
    for spec, match in [("my_rewards", "package.module:function"), ("no_such_module_xyz:f", "cannot import"),
                        ("my_rewards:missing", "no attribute"), ("my_rewards:NOT_CALLABLE", "not callable"),
                        ("my_rewards:__import__('os')", "no attribute")]:
        with pytest.raises(ConfigError, match=match):
            load_function(spec)
