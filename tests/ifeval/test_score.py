"""IFEval scoring (finegrain.ifeval.score, .instructions): accuracies and rewards against hand-derived values."""

from __future__ import annotations

import pytest

pytest.importorskip("if_verifiable", reason="needs finegrain[ifeval] (if-verifiable, Python >= 3.11)")

from finegrain.errors import ConfigError, DataError  # noqa: E402
from finegrain.ifeval.instructions import (  # noqa: E402
    check_instructions,
    describe,
    loose_variants,
    parse_instructions,
)
from finegrain.ifeval.score import count_words, prompt_content, reward, reward_all, score_responses  # noqa: E402

NO_COMMA, LOWER, FORBID, WORDS, KEY = ("punctuation:no_comma", "change_case:english_lowercase",
                                       "keywords:forbidden_words", "length_constraints:number_words",
                                       "keywords:existence")

ROWS = [
    {"key": 0, "prompt": "a", "instruction_id_list": [NO_COMMA, WORDS, KEY],
     "kwargs": [{}, {"num_words": 5, "relation": "at least"}, {"keywords": ["tea"]}]},
    {"key": 1, "prompt": "b", "instruction_id_list": [FORBID, KEY],
     "kwargs": [{"forbidden_words": ["lava"]}, {"keywords": ["volcano"]}]},
    {"key": 2, "prompt": "c", "instruction_id_list": [NO_COMMA, WORDS],
     "kwargs": [{}, {"num_words": 3, "relation": "at least"}]},
]
RESPONSES = [
    "i like green tea a lot",               # 6 words, no comma, 'tea': 3/3 followed
    "the volcano spat lava everywhere",     # forbidden 'lava' present, keyword present: 1/2
    "Sure, here it is:\nno commas at all",  # strict: comma in line 1 -> no_comma fails; 8 words >= 3: 1/2
]


def test_prompt_and_instruction_accuracies_by_hand():
    """Strict: prompts fully followed = row 0 only -> 1/3; instructions followed = 3 + 1 + 1 = 5 of 3 + 2 + 2 = 7.
    Loose: row 2 without its first line ('no commas at all', 4 words) follows both -> prompts 2/3, instructions 6/7.
    Words (\\w runs): 6 + 5 + 8 = 19 -> mean 19/3."""
    s = score_responses(ROWS, RESPONSES)
    assert s.n == 3
    assert s.prompt_strict == pytest.approx(1 / 3)
    assert s.instruction_strict == pytest.approx(5 / 7)
    assert s.prompt_loose == pytest.approx(2 / 3)
    assert s.instruction_loose == pytest.approx(6 / 7)
    assert s.mean_words == pytest.approx(19 / 3)
    assert s.per_instruction[NO_COMMA] == {"strict": 0.5, "loose": 1.0, "count": 2}
    assert s.per_instruction[KEY] == {"strict": 1.0, "loose": 1.0, "count": 2}
    assert s.per_instruction[FORBID] == {"strict": 0.0, "loose": 0.0, "count": 1}
    assert s.followed_strict == [[True, True, True], [False, True], [False, True]]


def test_an_empty_response_follows_nothing():
    """IFEval: an instruction is followed only by a non-blank response -- so 'no commas' cannot be won by silence."""
    assert check_instructions("   ", [NO_COMMA, LOWER], [{}, {}]) == [False, False]
    assert check_instructions("", [NO_COMMA], [{}], loose=True) == [False]
    assert score_responses(ROWS[:1], [""]).instruction_strict == 0.0


def test_loose_variants_are_ifevals_eight():
    v = loose_variants("*a*\nb\nc")
    assert v == ["*a*\nb\nc", "b\nc", "*a*\nb", "b", "a\nb\nc", "b\nc", "a\nb", "b"]


def test_count_words_counts_word_character_runs():
    assert count_words("it's a well-known fact, 42.") == 7
    assert count_words("") == 0


def test_rewards_read_the_instructions_from_the_prompt_text():
    """Prompt: no commas, at least 2 words, keyword 'tea'. 'tea, please' follows 2 of 3 -> 2/3; 'tea time' all 3."""
    text = "Talk about tea.\n\n" + " ".join(describe(i, k) for i, k in zip(
        [NO_COMMA, WORDS, KEY], [{}, {"num_words": 2, "relation": "at least"}, {"keywords": ["tea"]}]))
    conversational = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    assert reward([text, conversational], ["tea, please", "tea time"]) == pytest.approx([2 / 3, 1.0])
    assert reward_all([text, text], ["tea, please", "tea time"]) == [0.0, 1.0]
    with pytest.raises(DataError, match="none of the IFEval task's instructions"):
        reward(["just chat with me"], ["ok"])


def test_parse_inverts_describe():
    ids = [FORBID, LOWER, NO_COMMA, WORDS, KEY]
    kwargs = [{"forbidden_words": ["ash", "lava", "rock"]}, {}, {}, {"num_words": 40, "relation": "at least"},
              {"keywords": ["volcano"]}]
    text = "Write about volcanoes.\n\n" + " ".join(describe(i, k) for i, k in zip(ids, kwargs))
    assert parse_instructions(text) == (ids, kwargs)
    assert describe(FORBID, {"forbidden_words": ["a", "b", "c"]}) == 'Do not include the words "a", "b" or "c" in your response.'


def test_bad_input_names_the_file_row_and_field():
    with pytest.raises(DataError, match=r"file p\.jsonl, row 2, field 'kwargs'"):
        score_responses([ROWS[0], {"instruction_id_list": [NO_COMMA], "kwargs": []}], ["a", "b"], source="p.jsonl")
    with pytest.raises(DataError, match=r"row 1, field 'instruction_id_list'"):
        score_responses([{"kwargs": []}], ["a"])
    with pytest.raises(DataError, match="2 prompt rows but 1 responses"):
        score_responses(ROWS[:2], ["a"])
    with pytest.raises(DataError, match=r"row 1, field 'response'"):
        score_responses(ROWS[:1], [None])
    with pytest.raises(ConfigError, match="unknown IFEval instruction id"):
        check_instructions("x", ["made:up"], [{}])
    with pytest.raises(DataError, match="field 'prompt'"):
        prompt_content(42, row=3)


def test_unasked_rates_count_only_prompts_without_the_instruction():
    """Row 0 asks for no commas, rows 1 and 2 do not. Responses 0 and 1 are English lowercase without commas,
    response 2 is English capitals with a comma. By hand: no comma unasked 1 of 2 (row 1 yes, row 2 no);
    lowercase unasked 2 of 3 (rows 0, 1); capitals unasked 1 of 3 (row 2)."""
    rows = [{"instruction_id_list": [NO_COMMA], "kwargs": [{}]}, {"instruction_id_list": [KEY], "kwargs": [{"keywords": ["sea"]}]},
            {"instruction_id_list": [KEY], "kwargs": [{"keywords": ["sea"]}]}]
    responses = ["the sea is calm today and the boats are out on the water",
                 "we walked along the sea wall and watched the birds over the harbour",
                 "THE SEA WAS ROUGH, AND THE BOATS STAYED IN THE HARBOUR ALL DAY LONG"]
    s = score_responses(rows, responses)
    assert s.unasked == {NO_COMMA: {"rate": 0.5, "count": 2}, LOWER: {"rate": 2 / 3, "count": 3},
                         "change_case:english_capital": {"rate": 1 / 3, "count": 3}}
    assert s.per_instruction[NO_COMMA]["strict"] == 1.0  # the asked row is scored as before
