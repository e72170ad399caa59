"""Row kinds, implicit prompts and per-row validation (TRL column formats)."""

import logging
import math
from collections import Counter

import pytest

from finegrain.data.schema import check_columns, detect_kind, extract_prompt, validate_rows
from finegrain.errors import DataError

SKY = [{"role": "user", "content": "what color is the sky?"}]


def msg(role, content):
    return {"role": role, "content": content}


# ------------------------------------------------------------------------------------------------------ kinds


@pytest.mark.parametrize(
    "columns, kind",
    [
        (["prompt", "chosen", "rejected"], "preference"),
        (["chosen", "rejected"], "preference"),
        (["prompt", "chosen", "rejected", "subset", "margin"], "preference"),
        (["prompt", "rejected", "revised"], "revision"),
        (["prompt", "rejected", "revised", "chosen"], "revision"),
        (["prompt", "response", "labels"], "token"),
        (["prompt", "response", "spans"], "token"),
        (["prompt"], "prompt"),
        (["prompt", "completion"], "sft"),
        (["messages"], "sft"),
        (["text"], "sft"),
    ],
)
def test_detect_kind(columns, kind):
    assert detect_kind(columns) == kind


@pytest.mark.parametrize(
    "columns, match",
    [
        (["prompt", "completions", "labels"], "stepwise supervision"),
        (["prompt", "completion", "label"], "unpaired preference"),
        (["question", "answer"], "cannot tell the kind"),
    ],
)
def test_detect_kind_rejects(columns, match):
    with pytest.raises(DataError, match=match) as e:
        detect_kind(columns, source="f.jsonl")
    assert e.value.source == "f.jsonl"


@pytest.mark.parametrize(
    "kind, columns, missing",
    [
        ("preference", ["prompt"], "chosen"),
        ("preference", ["prompt", "chosen"], "rejected"),
        ("revision", ["prompt", "rejected"], "revised"),
        ("token", ["prompt", "response"], "labels"),
        ("sft", ["prompt"], "completion"),
        ("sft", ["foo"], "text"),
        ("prompt", ["chosen"], "prompt"),
        ("preference", ["chosen", "rejected", "ref_chosen_logps"], "ref_rejected_logps"),
        ("preference", ["chosen", "rejected", "rejected_token_rewards"], "chosen_token_rewards"),
    ],
)
def test_missing_column_is_a_file_wide_error(kind, columns, missing):
    with pytest.raises(DataError, match=f"missing column '{missing}'") as e:
        check_columns(kind, columns, source="f.jsonl")
    assert (e.value.source, e.value.row, e.value.field) == ("f.jsonl", None, missing)


def test_missing_column_is_not_skipped():
    """skip_invalid skips rows, never a column the whole data set lacks (prompt-only rows given as pairs)."""
    with pytest.raises(DataError, match="missing column 'chosen'"):
        validate_rows([{"prompt": "hi"}], "preference", skip_invalid=True)


# ------------------------------------------------------------------------------------------- implicit prompts


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        # TRL's HH case: the space before the response goes to the response.
        ("\n\nHuman: sky?\n\nAssistant: blue", "\n\nHuman: sky?\n\nAssistant: red",
         ("\n\nHuman: sky?\n\nAssistant:", " blue", " red")),
        # the first difference inside a word: cut back to the whitespace before it (TRL would cut "The ca|t").
        ("The cat sat", "The cap sat", ("The", " cat sat", " cap sat")),
        # one response extends the other: the prompt still ends at a whitespace boundary.
        ("say a b", "say a b c", ("say a", " b", " b c")),
        # no whitespace in the common prefix: the prompt is empty.
        ("blue sky", "black sky", ("", "blue sky", "black sky")),
        # a newline is whitespace too.
        ("Q\nyes", "Q\nno", ("Q", "\nyes", "\nno")),
    ],
)
def test_extract_prompt_strings(chosen, rejected, expected):
    assert extract_prompt(chosen, rejected) == expected
    prompt, c, r = expected
    assert prompt + c == chosen and prompt + r == rejected


def test_extract_prompt_messages():
    chosen = [msg("system", "be brief"), *SKY, msg("assistant", "blue")]
    rejected = [msg("system", "be brief"), *SKY, msg("assistant", "red")]
    assert extract_prompt(chosen, rejected) == (chosen[:-1], chosen[-1:], rejected[-1:])
    with pytest.raises(ValueError, match="differ before"):
        extract_prompt(chosen, [msg("user", "other"), msg("assistant", "red")])
    with pytest.raises(ValueError, match="both be strings"):
        extract_prompt("x", [])


def test_implicit_prompt_rows():
    rows = validate_rows([
        {"chosen": "Q: sky?\nA: blue", "rejected": "Q: sky?\nA: red"},
        {"chosen": [*SKY, msg("assistant", "blue")], "rejected": [*SKY, msg("assistant", "red")]},
    ])
    assert rows[0] | {} == {"prompt": "Q: sky?\nA:", "chosen": " blue", "rejected": " red", "conversational": False,
                           "source": "<list>", "row": 0}
    assert rows[1]["prompt"] == SKY and rows[1]["chosen"] == "blue" and rows[1]["conversational"]


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ({"chosen": [*SKY, msg("assistant", "a")], "rejected": [msg("user", "x"), msg("assistant", "b")]},
         "rejected", "prompts differ"),
        ({"chosen": [*SKY, msg("user", "a")], "rejected": [*SKY, msg("assistant", "b")]}, "chosen", "wrong type"),
        ({"chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]}, "chosen", "empty prompt"),
        ({"chosen": "same text", "rejected": "same text"}, "rejected", "chosen identical to rejected"),
        ({"chosen": "say a  ", "rejected": "say a  b"}, "chosen", "empty response"),  # chosen becomes " "
    ],
)
def test_implicit_prompt_errors(row, field, reason):
    with pytest.raises(DataError) as e:
        validate_rows([row])
    assert (e.value.row, e.value.field, e.value.reason.split(":")[0]) == (0, field, reason)


# -------------------------------------------------------------------------------------------------- validation


def test_preference_rows_keep_known_columns_only():
    rows = validate_rows([{
        "prompt": "p", "chosen": "a", "rejected": "b", "subset": "chat", "margin": 2, "id": 7,
        "chosen_token_rewards": [0.5, 1], "rejected_token_rewards": [-1], "ref_chosen_logps": -3.5,
        "ref_rejected_logps": -4,
    }])
    assert rows == [{
        "prompt": "p", "chosen": "a", "rejected": "b", "conversational": False, "subset": "chat", "margin": 2.0,
        "chosen_token_rewards": [0.5, 1.0], "rejected_token_rewards": [-1.0], "ref_chosen_logps": -3.5,
        "ref_rejected_logps": -4.0, "source": "<list>", "row": 0,
    }]


def test_conversational_explicit_prompt():
    rows = validate_rows([{"prompt": SKY, "chosen": [msg("assistant", "blue")], "rejected": "red"}])
    assert rows[0]["prompt"] == SKY and (rows[0]["chosen"], rows[0]["rejected"]) == ("blue", "red")
    assert rows[0]["conversational"] is True


GOOD = {
    "prompt": "what color?", "chosen": "blue", "rejected": "red", "subset": "chat", "margin": 1.0,
    "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0, "chosen_token_rewards": [0.1], "rejected_token_rewards": [0],
}


@pytest.mark.parametrize(
    "change, field, reason",
    [
        ({"chosen": None}, "chosen", "missing value"),
        ({"chosen": 3}, "chosen", "wrong type"),
        ({"prompt": ["what"]}, "prompt", "wrong type"),
        ({"prompt": ""}, "prompt", "empty prompt"),
        ({"prompt": []}, "prompt", "empty prompt"),
        ({"rejected": "blue"}, "rejected", "chosen identical to rejected"),
        ({"margin": float("nan")}, "margin", "non-finite value"),
        ({"margin": float("inf")}, "margin", "non-finite value"),
        ({"margin": "1.0"}, "margin", "wrong type"),
        ({"margin": True}, "margin", "wrong type"),
        ({"ref_chosen_logps": -math.inf}, "ref_chosen_logps", "non-finite value"),
        ({"ref_rejected_logps": None}, "ref_rejected_logps", "missing value"),
        ({"chosen_token_rewards": [0.1, float("nan")]}, "chosen_token_rewards", "non-finite value"),
        ({"chosen_token_rewards": "0.1"}, "chosen_token_rewards", "wrong type"),
        ({"rejected_token_rewards": [True]}, "rejected_token_rewards", "wrong type"),
        ({"prompt": [{"role": "user", "content": 5}]}, "prompt", "non-string content"),
        ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "prompt", "non-string content"),
        ({"prompt": [{"content": "x"}]}, "prompt", "wrong type"),
        ({"prompt": ["x"]}, "prompt", "wrong type"),
        ({"chosen": [msg("assistant", "a"), msg("assistant", "b")]}, "chosen", "wrong type"),
        ({"chosen": [msg("user", "a")]}, "chosen", "wrong type"),
        ({"chosen": "bad \ud800 text"}, "chosen", "invalid text"),
        ({"subset": 3}, "subset", "wrong type"),
    ],
)
def test_bad_preference_rows(change, field, reason):
    rows = [dict(GOOD), dict(GOOD, chosen="sky blue"), {**GOOD, **change}]
    with pytest.raises(DataError) as e:
        validate_rows(rows)
    assert (e.value.source, e.value.row, e.value.field, e.value.reason.split(":")[0]) == ("<list>", 2, field, reason)
    assert f"row 3, field '{field}'" in str(e.value)  # the third row: messages count rows from 1
    assert "--skip_invalid_rows" in str(e.value)  # the flag that would have skipped it


def test_an_empty_response_is_an_eos_only_sample():
    """A policy may end at once: an empty chosen/rejected response is kept (tokenized it is EOS only), as is an
    empty SFT completion; a revision still needs text on both sides."""
    rows = validate_rows([dict(GOOD, chosen=""), dict(GOOD, rejected=" \n\t"),
                          dict(GOOD, chosen=[msg("assistant", "")], prompt=[msg("user", "what?")])])
    assert [r["chosen"] for r in rows][:2] == ["", "blue"] and rows[1]["rejected"] == " \n\t"
    assert validate_rows([{"prompt": "p", "completion": ""}])[0]["completion"] == ""
    with pytest.raises(DataError, match="empty response"):
        validate_rows([{"prompt": "p", "rejected": "r", "revised": ""}])


def test_skip_invalid_counts_and_logs_once(caplog):
    good = {"prompt": "what color?", "chosen": "blue", "rejected": "red"}
    rows = [
        dict(good),
        dict(good, chosen=None),
        dict(good, rejected=3),
        dict(good, chosen=None),
        dict(good, rejected="blue"),
        dict(good, chosen="sky"),
    ]
    skipped = Counter()
    with caplog.at_level(logging.WARNING, logger="finegrain.data.schema"):
        kept = validate_rows(rows, skip_invalid=True, skipped=skipped)
    assert [r["row"] for r in kept] == [0, 5]
    assert skipped == {"missing value in 'chosen'": 2, "wrong type in 'rejected'": 1,
                       "chosen identical to rejected in 'rejected'": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("<list>: skipped 4 of 6 rows at validation (")
    assert "missing value in 'chosen': 2" in lines[0]


def test_no_log_when_nothing_is_skipped(caplog):
    with caplog.at_level(logging.WARNING):
        validate_rows([GOOD], skip_invalid=True)
    assert not caplog.records


# ---------------------------------------------------------------------------------------------- other kinds


def test_revision_rows():
    """``chosen`` is optional row by row in revisions."""
    rows = validate_rows([
        {"prompt": "p", "rejected": "the sky is red", "revised": "the sky is blue"},
        {"prompt": "p", "rejected": "a", "revised": "b", "chosen": "c"},
    ])
    assert rows[0]["revised"] == "the sky is blue" and rows[0]["chosen"] is None and rows[1]["chosen"] == "c"
    with pytest.raises(DataError, match="empty response") as e:
        validate_rows([{"prompt": "p", "rejected": "a", "revised": "b", "chosen": ""}])
    assert e.value.field == "chosen"


def test_revision_identical_to_rejected_is_an_error_or_a_counted_skip():
    rows = [{"prompt": "p", "rejected": "same", "revised": "same"}, {"prompt": "p", "rejected": "a", "revised": "b"}]
    with pytest.raises(DataError, match="revised identical to rejected") as e:
        validate_rows(rows)
    assert (e.value.row, e.value.field) == (0, "revised")
    skipped = Counter()
    assert len(validate_rows(rows, skip_invalid=True, skipped=skipped)) == 1
    assert skipped == {"revised identical to rejected in 'revised'": 1}


def test_revision_implicit_prompt():
    rows = validate_rows([{"rejected": "Q: x? A: no", "revised": "Q: x? A: yes"}])
    assert (rows[0]["prompt"], rows[0]["rejected"], rows[0]["revised"]) == ("Q: x? A:", " no", " yes")


def test_token_rows_labels_and_spans():
    rows = validate_rows([{"prompt": "p", "response": "the sky", "labels": [1, 0]}])
    assert rows[0]["labels"] == [1, 0]
    rows = validate_rows([{"prompt": "p", "response": "the sky", "labels": [0.5, True]}])
    assert rows[0]["labels"] == [0.5, 1.0]
    rows = validate_rows([{"prompt": "p", "response": "the sky",
                           "spans": [{"start": 4, "end": 7, "label": -1}, [0, 3, 1]]}])
    assert rows[0]["spans"] == [(0, 3, 1), (4, 7, -1)]


@pytest.mark.parametrize(
    "change, field, reason",
    [
        ({"labels": []}, "labels", "empty labels"),
        ({"labels": [1, float("nan")]}, "labels", "non-finite value"),
        ({"labels": [1, "x"]}, "labels", "wrong type"),
        ({"labels": "1 0"}, "labels", "wrong type"),
        ({"labels": None, "spans": [{"start": 0, "end": 9, "label": 1}]}, "spans", "bad span"),
        ({"labels": None, "spans": [{"start": 2, "end": 2, "label": 1}]}, "spans", "bad span"),
        ({"labels": None, "spans": [[0, 4, 1], [2, 6, 0]]}, "spans", "bad span"),
        ({"labels": None, "spans": [{"start": 0.0, "end": 3, "label": 1}]}, "spans", "wrong type"),
        ({"labels": None, "spans": [{"start": 0, "end": 3}]}, "spans", "wrong type"),
        ({"labels": None, "spans": [(0, 3)]}, "spans", "wrong type"),
        ({"response": ""}, "response", "empty response"),
    ],
)
def test_bad_token_rows(change, field, reason):
    row = {"prompt": "p", "response": "the sky", "labels": [1, 0], **change}
    row = {k: v for k, v in row.items() if v is not None}
    with pytest.raises(DataError) as e:
        validate_rows([row])
    assert (e.value.row, e.value.field, e.value.reason.split(":")[0]) == (0, field, reason)


def test_token_rows_with_labels_or_spans_row_by_row():
    rows = validate_rows([{"prompt": "p", "response": "r", "labels": [1]}, {"prompt": "p", "response": "r", "spans": []}])
    assert rows[0]["labels"] == [1] and rows[1]["spans"] == []
    with pytest.raises(DataError, match="not both"):
        validate_rows([{"prompt": "p", "response": "r", "labels": [1], "spans": []}])
    with pytest.raises(DataError, match="missing value") as e:
        validate_rows([{"prompt": "p", "response": "r", "labels": None, "spans": None}])
    assert e.value.field == "labels"


def test_prompt_rows():
    assert validate_rows([{"prompt": "hi"}, {"prompt": SKY}]) == [
        {"prompt": "hi", "conversational": False, "source": "<list>", "row": 0},
        {"prompt": SKY, "conversational": True, "source": "<list>", "row": 1},
    ]
    with pytest.raises(DataError, match="empty prompt"):
        validate_rows([{"prompt": "  "}])


def test_sft_rows():
    assert validate_rows([{"text": "the cat"}])[0] | {} == {
        "prompt": "", "completion": "the cat", "conversational": False, "source": "<list>", "row": 0}
    row = validate_rows([{"prompt": "p", "completion": "c"}])[0]
    assert (row["prompt"], row["completion"]) == ("p", "c")
    row = validate_rows([{"messages": [*SKY, msg("assistant", "blue")]}])[0]
    assert (row["prompt"], row["completion"], row["conversational"]) == (SKY, "blue", True)
    with pytest.raises(DataError, match="end with an assistant message") as e:
        validate_rows([{"messages": SKY}])
    assert e.value.field == "messages"
    with pytest.raises(DataError, match="empty prompt"):
        validate_rows([{"messages": [msg("assistant", "blue")]}])


def test_kind_given_explicitly_overrides_detection():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    assert validate_rows(rows, "prompt") == [{"prompt": "p", "conversational": False, "source": "<list>", "row": 0}]
