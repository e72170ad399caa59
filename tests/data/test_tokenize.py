"""Tokenization into prompt + response: special tokens, offsets, truncation, per-token extras."""

import logging
import sys
from collections import Counter
from pathlib import Path

import pytest

from finegrain.data.collate import collate_preferences
from finegrain.data.schema import detect_kind, validate_rows
from finegrain.data.tokenize import (
    IGNORE_INDEX,
    TokenLimits,
    spans_to_labels,
    tokenize_prompt,
    tokenize_response,
    tokenize_rows,
)
from finegrain.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_tokenizers import CHATML, VOCAB, bpe_tokenizer, word_tokenizer  # noqa: E402

WORD = word_tokenizer()
BPE = bpe_tokenizer()
SKY = [{"role": "user", "content": "what color is the sky ?"}]


def ids(text):
    return [VOCAB[w] for w in text.split()]


def tok(rows, tokenizer=WORD, limits=None, **kwargs):
    kind = detect_kind(rows[0])
    return tokenize_rows(validate_rows(rows, kind), tokenizer, kind, limits, **kwargs)


def test_worked_example_truncation_and_masks_by_hand():
    """Word-level ids: [PAD] 0, [BOS] 1, [EOS] 2, the 4, sky 13, is 10, blue 11, red 12, what 14, color 15, ? 16, . 17.

    Prompt "what color is the sky ?" -> [BOS] what color is the sky ? = [1, 14, 15, 10, 4, 13, 16] (7 tokens).
    max_prompt_length 5 keeps the end and the BOS: [1] + [10, 4, 13, 16].
    Chosen "the sky is blue ." -> [4, 13, 10, 11, 17] + EOS 2 = 6 tokens; max_length 10 leaves 10 - 5 = 5, so the
    chosen response is cut to [4, 13, 10, 11, 17] (no EOS, truncated). Rejected "red ." -> [12, 17, 2] fits.
    """
    rows = [{"prompt": "what color is the sky ?", "chosen": "the sky is blue .", "rejected": "red ."}]
    (ex,) = tok(rows, limits=TokenLimits(max_length=10, max_prompt_length=5))
    assert ex["prompt_input_ids"] == [1, 10, 4, 13, 16] and ex["prompt_truncated"]
    assert ex["chosen_input_ids"] == [4, 13, 10, 11, 17] and ex["chosen_truncated"]
    assert ex["chosen_offsets"] == [(0, 3), (4, 7), (8, 10), (11, 15), (16, 17)]
    assert ex["rejected_input_ids"] == [12, 17, 2] and not ex["rejected_truncated"]
    assert ex["rejected_offsets"] == [(0, 3), (4, 5), (5, 5)]  # EOS at (len, len)
    batch = collate_preferences([ex], pad_token_id=0)
    assert batch.prompt_input_ids.tolist() == [[1, 10, 4, 13, 16]] * 2
    assert batch.completion_input_ids.tolist() == [[4, 13, 10, 11, 17], [12, 17, 2, 0, 0]]
    assert batch.completion_mask.int().tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch.extras["truncated"].tolist() == [True, False]


def test_over_long_prompt_is_an_error_when_truncation_is_off():
    rows = [{"prompt": "what color is the sky ?", "chosen": "blue", "rejected": "red"}]
    limits = TokenLimits(max_length=10, max_prompt_length=5, truncate_prompt=False)
    with pytest.raises(DataError, match="7 tokens > max_prompt_length 5") as e:
        tok(rows, limits=limits)
    assert (e.value.source, e.value.row, e.value.field) == ("<list>", 0, "prompt")
    skipped = Counter()
    assert tok(rows * 2, limits=limits, skip_invalid=True, skipped=skipped) == []
    assert skipped == {"prompt too long in 'prompt'": 2}


def test_truncation_is_logged(caplog):
    rows = [{"prompt": "what color is the sky ?", "chosen": "blue", "rejected": "red"}]
    with caplog.at_level(logging.WARNING, logger="finegrain.data.tokenize"):
        tok(rows, limits=TokenLimits(max_length=10, max_prompt_length=5))
    assert ["1 of 1 prompts kept their last 5 tokens" in r.getMessage() for r in caplog.records] == [True]


def test_max_completion_length_and_no_limits():
    rows = [{"prompt": "a", "completion": "b c d b c d"}]
    (ex,) = tok(rows, limits=TokenLimits(max_length=None, max_prompt_length=None, max_completion_length=3))
    assert ex["completion_input_ids"] == ids("b c d") and ex["truncated"]
    (ex,) = tok(rows, limits=TokenLimits(max_length=None, max_prompt_length=None))
    assert ex["completion_input_ids"] == ids("b c d b c d") + [2] and not ex["truncated"]


def test_prompt_limit_defaults_to_max_length_minus_one():
    rows = [{"prompt": "a b c d a b c d", "completion": "c"}]
    (ex,) = tok(rows, limits=TokenLimits(max_length=4, max_prompt_length=None))
    assert ex["prompt_input_ids"] == [1] + ids("c d") and ex["completion_input_ids"] == ids("c")


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_length=5, max_prompt_length=5), dict(max_length=0), dict(max_prompt_length=-1),
     dict(max_completion_length=1.5), dict(max_length=True)],
)
def test_bad_limits(kwargs):
    with pytest.raises(ConfigError):
        TokenLimits(**kwargs)


def test_eos_is_not_doubled():
    r_ids, offsets, n_text = tokenize_response(WORD, "blue [EOS]")
    assert r_ids == [VOCAB["blue"], 2] and n_text == 2 and offsets == [(0, 4), (5, 10)]
    r_ids, _, n_text = tokenize_response(WORD, "blue")
    assert r_ids == [VOCAB["blue"], 2] and n_text == 1
    assert tokenize_response(WORD, "blue", add_eos=False)[0] == [VOCAB["blue"]]


def test_empty_prompt_becomes_bos_or_an_error():
    (ex,) = tok([{"text": "the cat"}])
    assert ex["prompt_input_ids"] == [1] and ex["completion_input_ids"] == ids("the cat") + [2]
    for tokenizer in (word_tokenizer(bos=False), BPE):
        with pytest.raises(DataError, match="no BOS token") as e:
            tok([{"text": "the cat"}], tokenizer)
        assert (e.value.row, e.value.field) == (0, "prompt")


def test_string_prompt_gets_special_tokens_conversational_prompt_uses_the_template():
    assert tokenize_prompt(WORD, "the cat") == [1] + ids("the cat")
    bpe = bpe_tokenizer(CHATML)
    text = bpe.apply_chat_template(SKY, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>what color is the sky ?\n<|assistant|>"
    (ex,) = tok([{"prompt": SKY, "chosen": [{"role": "assistant", "content": "blue"}], "rejected": "red"}], bpe)
    assert ex["prompt_input_ids"] == bpe(text, add_special_tokens=False)["input_ids"]
    assert ex["chosen_text"] == "blue" and ex["chosen_input_ids"][-1] == bpe.eos_token_id


def test_template_bos_is_not_doubled():
    w = word_tokenizer("[BOS] {% for m in messages %}{{ m['content'] }} {% endfor %}")
    assert tokenize_prompt(w, [{"role": "user", "content": "the cat"}]) == [1] + ids("the cat")
    w_plain = word_tokenizer("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    assert tokenize_prompt(w_plain, [{"role": "user", "content": "the cat"}]) == ids("the cat")


def test_conversational_without_a_chat_template_falls_back_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="finegrain.data.tokenize"):
        (ex,) = tok([{"prompt": SKY, "completion": "blue"}], BPE)
    assert BPE.decode(ex["prompt_input_ids"]) == "user: what color is the sky ?\nassistant:"
    assert any("no chat template" in r.getMessage() for r in caplog.records)


def test_chat_template_failure_is_a_row_error():
    w = word_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match="roles must alternate") as e:
        tok([{"prompt": "ok", "completion": "c"}, {"prompt": SKY, "completion": "c"}], w)
    assert (e.value.row, e.value.field) == (1, "prompt")


@pytest.mark.parametrize("text", ["the cat sat on the mat.", "héllo wörld, naïve café — 你好世界 🙂", "  spaced  out "])
def test_bpe_offsets_cover_the_text(text):
    r_ids, offsets, n_text = tokenize_response(BPE, text)
    assert len(r_ids) == len(offsets) == n_text + 1 and offsets[-1] == (len(text), len(text))
    assert all(0 <= s <= e <= len(text) for s, e in offsets)
    assert [s for s, _ in offsets] == sorted(s for s, _ in offsets)
    assert BPE.decode(r_ids[:-1]) == text


def test_labels_align_with_response_tokens():
    rows = [{"prompt": "p", "response": "the sky is blue", "labels": [0, 0, 1, 1]},
            {"prompt": "p", "response": "the sky is blue", "labels": [0, 0, 1, 1, 1]}]
    a, b = tok(rows)
    assert a["token_labels"] == [0, 0, 1, 1, IGNORE_INDEX]  # given without EOS: EOS is ignored
    assert b["token_labels"] == [0, 0, 1, 1, 1]  # given with EOS
    assert len(a["token_labels"]) == len(a["completion_input_ids"])
    (c,) = tok(rows[:1], limits=TokenLimits(max_length=4, max_prompt_length=1))
    assert c["completion_input_ids"] == ids("the sky is") and c["token_labels"] == [0, 0, 1]


def test_label_length_mismatch_names_file_row_field():
    rows = [{"prompt": "p", "response": "the sky is blue", "labels": [0, 0, 1, 1]},
            {"prompt": "p", "response": "the sky is blue", "labels": [0, 1]}]
    with pytest.raises(DataError, match="2 values for a response of 4 tokens \\(5 with EOS\\)") as e:
        tok(rows)
    assert (e.value.source, e.value.row, e.value.field, e.value.reason.split(":")[0]) == (
        "<list>", 1, "labels", "length mismatch")
    skipped = Counter()
    assert len(tok(rows, skip_invalid=True, skipped=skipped)) == 1
    assert skipped == {"length mismatch in 'labels'": 1}


def test_spans_become_token_labels_through_offsets():
    text = "the sky is blue"
    rows = [{"prompt": "p", "response": text, "spans": [{"start": 8, "end": 15, "label": 1}, [0, 3, 0]]}]
    (ex,) = tok(rows)
    assert ex["token_labels"] == [0, IGNORE_INDEX, 1, 1, IGNORE_INDEX]
    (ex,) = tok(rows, BPE)
    for (s, e), label in zip(ex["completion_offsets"], ex["token_labels"]):
        inside = [lab for a, b, lab in [(8, 15, 1), (0, 3, 0)] if min(e, b) > max(s, a)]
        assert label == (inside[0] if inside else IGNORE_INDEX)


def test_spans_to_labels_by_hand():
    """Token (2, 6) overlaps span (0, 3) by 1 char and span (3, 8) by 3: it takes the second label."""
    assert spans_to_labels([(0, 2), (2, 6), (6, 9), (9, 9)], [(0, 3, 5), (3, 8, 7)]) == [5, 7, 7, -100]
    assert spans_to_labels([(0, 4)], [(0, 2, 1), (2, 4, 2)]) == [1]  # a tie goes to the earlier span
    assert spans_to_labels([(0, 4), (5, 6)], [], fill=0) == [0, 0]


def test_token_rewards_length_checked_and_eos_gets_zero():
    row = {"prompt": "p", "chosen": "the sky", "rejected": "red", "chosen_token_rewards": [0.5, -0.5],
           "rejected_token_rewards": [1.0, 0.0]}
    (ex,) = tok([row])
    assert ex["chosen_token_rewards"] == [0.5, -0.5, 0.0] and ex["rejected_token_rewards"] == [1.0, 0.0]
    with pytest.raises(DataError, match="4 values for a response of 2 tokens \\(3 with EOS\\)") as e:
        tok([dict(row, chosen_token_rewards=[1.0, 2.0, 3.0, 4.0])])
    assert e.value.field == "chosen_token_rewards"


def test_revision_prompt_only_and_sft_rows():
    (rev,) = tok([{"prompt": "p", "rejected": "the sky is red", "revised": "the sky is blue"}])
    assert rev["rejected_input_ids"] == ids("the sky is red") + [2] and rev["revised_text"] == "the sky is blue"
    assert "chosen_input_ids" not in rev
    (p,) = tok([{"prompt": SKY}])
    assert p["completion_input_ids"] == [] and p["prompt_input_ids"][0] == 1
    (s,) = tok([{"messages": [*SKY, {"role": "assistant", "content": "blue"}]}], bpe_tokenizer(CHATML))
    assert s["completion_text"] == "blue" and s["truncated"] is False


def test_extras_and_origins_are_carried():
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5, "subset": "math",
           "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}
    (ex,) = tokenize_rows(validate_rows([row]), WORD, "preference")
    assert {k: ex[k] for k in ("margin", "subset", "ref_chosen_logps", "ref_rejected_logps", "source", "row")} == {
        "margin": 1.5, "subset": "math", "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0, "source": "<list>",
        "row": 0}


class _Picky:
    """A tokenizer that rejects any text containing 'boom', as a real one may reject odd input."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, texts, **kwargs):
        if any("boom" in t for t in ([texts] if isinstance(texts, str) else texts)):
            raise TypeError("cannot encode")
        return self.inner(texts, **kwargs)


def test_a_text_the_tokenizer_rejects_is_reported_on_its_row():
    rows = [{"prompt": "p", "completion": "fine"}, {"prompt": "p", "completion": "boom"}]
    with pytest.raises(DataError, match="cannot tokenize") as e:
        tok(rows, _Picky(WORD))
    assert (e.value.row, e.value.field) == (1, "completion")
    assert len(tok(rows, _Picky(WORD), skip_invalid=True)) == 1


def test_tokenizer_without_eos():
    w = word_tokenizer()
    w.eos_token = None
    with pytest.raises(ConfigError, match="no eos_token"):
        tok([{"prompt": "p", "completion": "a"}], w)
    assert tok([{"prompt": "p", "completion": "a"}], w, add_eos=False)[0]["completion_input_ids"] == ids("a")
