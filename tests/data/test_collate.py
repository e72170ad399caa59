"""Collators: the padded layout of finegrain.types, extras, and the worked example of the module docstring."""

import doctest
import sys
from pathlib import Path

import pytest
import torch

from finegrain.data import collate
from finegrain.data.collate import collate_completions, collate_preferences, pad_token_id
from finegrain.data.prepared import CompletionData, PreferenceData
from finegrain.models.forward import model_inputs
from finegrain.types import CompletionBatch, PreferenceBatch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_tokenizers import bpe_tokenizer, word_tokenizer  # noqa: E402


def test_module_docstring_examples_run():
    result = doctest.testmod(collate)
    assert result.attempted >= 6 and result.failed == 0


def test_preference_rows_chosen_then_rejected_with_extras():
    examples = [
        {"prompt_input_ids": [1, 5], "chosen_input_ids": [7, 2], "rejected_input_ids": [8, 8, 2],
         "chosen_token_rewards": [0.5, 0.0], "rejected_token_rewards": [-1.0, -1.0, 0.0],
         "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0, "margin": 0.25, "index": 3,
         "chosen_truncated": False, "rejected_truncated": True},
        {"prompt_input_ids": [1], "chosen_input_ids": [9, 2], "rejected_input_ids": [6, 2],
         "chosen_token_rewards": [1.0, 0.0], "rejected_token_rewards": [2.0, 0.0],
         "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0, "margin": 0.5, "index": 0,
         "chosen_truncated": False, "rejected_truncated": False},
    ]
    b = collate_preferences(examples, pad_token_id=0)
    assert isinstance(b, PreferenceBatch) and b.num_pairs == 2 and b.num_rows == 4
    assert b.prompt_input_ids.tolist() == [[1, 5], [0, 1], [1, 5], [0, 1]]
    assert b.completion_input_ids.tolist() == [[7, 2, 0], [9, 2, 0], [8, 8, 2], [6, 2, 0]]
    assert b.completion_mask.dtype == torch.bool and b.prompt_attention_mask.dtype == torch.long
    x = b.extras
    assert x["token_rewards"].tolist() == [[0.5, 0, 0], [1, 0, 0], [-1, -1, 0], [2, 0, 0]]
    assert x["ref_logps"].tolist() == [-1, -3, -2, -4]
    assert x["margin"].tolist() == [0.25, 0.5, 0.25, 0.5] and x["index"].tolist() == [3, 0, 3, 0]
    assert x["truncated"].tolist() == [False, False, True, False]
    assert all(v.shape[0] == 4 for v in x.values())
    ref_chosen, ref_rejected = x["ref_logps"].chunk(2)
    assert ref_chosen.tolist() == [-1, -3] and ref_rejected.tolist() == [-2, -4]


def test_completion_labels_long_or_float_and_padding():
    ints = [{"prompt_input_ids": [1], "completion_input_ids": [4, 2], "token_labels": [1, -100]},
            {"prompt_input_ids": [1, 3, 3], "completion_input_ids": [5], "token_labels": [0]}]
    b = collate_completions(ints, pad_token_id=0)
    assert b.extras["token_labels"].dtype == torch.long
    assert b.extras["token_labels"].tolist() == [[1, -100], [0, -100]]
    floats = [dict(ints[0], token_labels=[0.5, -100]), ints[1]]
    b = collate_completions(floats, pad_token_id=0)
    assert b.extras["token_labels"].dtype == torch.float32
    assert b.extras["token_labels"].tolist() == [[0.5, -100.0], [0.0, -100.0]]


def test_pad_to_multiple_of():
    ex = [{"prompt_input_ids": [1, 2, 3], "completion_input_ids": [4, 5, 6, 7, 8]}]
    b = collate_completions(ex, pad_token_id=0, pad_to_multiple_of=4)
    assert b.prompt_input_ids.tolist() == [[0, 1, 2, 3]] and b.completion_input_ids.tolist() == [[4, 5, 6, 7, 8, 0, 0, 0]]
    assert b.completion_mask.sum().item() == 5 and b.prompt_attention_mask.tolist() == [[0, 1, 1, 1]]


def test_prompt_only_and_empty_batches():
    b = collate_completions([{"prompt_input_ids": [1, 4], "completion_input_ids": []}], pad_token_id=0)
    assert b.completion_input_ids.shape == (1, 0) and b.completion_mask.shape == (1, 0)
    b = collate_completions([], pad_token_id=0)
    assert b.num_rows == 0 and b.prompt_input_ids.shape == (0, 0)


def test_extras_present_on_some_examples_only_is_an_error():
    ex = [{"prompt_input_ids": [1], "completion_input_ids": [4], "token_labels": [1]},
          {"prompt_input_ids": [1], "completion_input_ids": [4]}]
    with pytest.raises(ValueError, match="'token_labels' is present in some examples"):
        collate_completions(ex, pad_token_id=0)
    with pytest.raises(ValueError, match="3 'token_labels' values for 1 response tokens"):
        collate_completions([dict(ex[0], token_labels=[1, 2, 3])], pad_token_id=0)
    pair = {"prompt_input_ids": [1], "chosen_input_ids": [4], "rejected_input_ids": [5], "ref_chosen_logps": -1.0}
    with pytest.raises(ValueError, match="only one of ref_chosen_logps"):
        collate_preferences([pair], pad_token_id=0)


def test_pad_token_id_from_the_tokenizer():
    assert pad_token_id(word_tokenizer()) == 0
    bpe = bpe_tokenizer()
    bpe.pad_token = None
    assert pad_token_id(bpe) == bpe.eos_token_id
    ex = [{"prompt_input_ids": [1, 2], "completion_input_ids": [3]}, {"prompt_input_ids": [1], "completion_input_ids": [3, 3]}]
    assert collate_completions(ex, pad_token_id(bpe)).prompt_input_ids[1, 0].item() == bpe.eos_token_id
    pair = [{"prompt_input_ids": [1], "chosen_input_ids": [4], "rejected_input_ids": [5, 6]}]
    assert isinstance(collate_preferences(pair, pad_token_id(word_tokenizer()), pad_to_multiple_of=8), PreferenceBatch)


def test_batches_feed_the_model_layout():
    """Prompt + response of each row, read back through the masks, are the tokenized ids; positions count tokens."""
    rows = [{"prompt": "what color is the sky ?", "chosen": "blue .", "rejected": "the sky is red ."},
            {"prompt": "the cat", "chosen": "sat on the mat .", "rejected": "is red"}]
    data = PreferenceData.from_source(rows, word_tokenizer())
    batch = data.collate([0, 1])
    input_ids, attention, positions = model_inputs(batch)
    for i, (ex, side) in enumerate([(data[0], "chosen"), (data[1], "chosen"), (data[0], "rejected"), (data[1], "rejected")]):
        assert input_ids[i][attention[i].bool()].tolist() == ex["prompt_input_ids"] + ex[f"{side}_input_ids"]
        assert positions[i][attention[i].bool()].tolist() == list(range(int(attention[i].sum())))


def test_completion_data_with_token_labels():
    rows = [{"prompt": "p", "response": "the sky is blue", "labels": [0, 0, 1, 1]},
            {"prompt": "p", "response": "red", "labels": [1]}]
    data = CompletionData.from_source(rows, word_tokenizer())
    b = data.collate([1, 0])
    assert isinstance(b, CompletionBatch)
    assert b.extras["token_labels"].tolist() == [[1, -100, -100, -100, -100], [0, 0, 1, 1, -100]]
    assert b.extras["index"].tolist() == [1, 0]
