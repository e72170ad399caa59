"""Prompt generation (finegrain.ifeval.prompts): deterministic, held-out topics, parseable, never self-conflicting."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("if_verifiable", reason="needs finegrain[ifeval] (if-verifiable, Python >= 3.11)")

from finegrain.errors import ConfigError  # noqa: E402
from finegrain.ifeval.instructions import CONTENT, TOKEN_LOCAL, parse_instructions  # noqa: E402
from finegrain.ifeval.prompts import TOPICS, make_prompts, split_topics  # noqa: E402


def test_prompts_are_deterministic_and_test_topics_are_unseen():
    a, b = make_prompts(3, 60, 30), make_prompts(3, 60, 30)
    assert a == b
    assert make_prompts(4, 60, 30) != a
    train_topics = {r["topic"] for r in a["train"]}
    test_topics = {r["topic"] for r in a["test"]}
    assert not train_topics & test_topics
    assert len(test_topics) == 12 and len(train_topics) == len(TOPICS) - 12
    keys = [r["key"] for s in a.values() for r in s]
    assert len(keys) == len(set(keys)) == 90
    assert len({r["prompt"][0]["content"] for r in a["train"]}) == 60  # no duplicate prompt


def test_every_prompt_reads_back_and_carries_content_instructions():
    rows = make_prompts(0, 200, 100)
    for row in rows["train"] + rows["test"]:
        assert row["prompt"][0]["role"] == "user"
        ids, kwargs = parse_instructions(row["prompt"][0]["content"])
        assert (ids, kwargs) == (row["instruction_id_list"], row["kwargs"])
        local = [i for i in ids if i in TOKEN_LOCAL]
        assert 1 <= len(local) <= 2 and ids[-2:] == list(CONTENT)
        assert not {"change_case:english_lowercase", "change_case:english_capital"} <= set(ids)
        keyword = kwargs[-1]["keywords"][0]
        for i, k in zip(ids, kwargs):
            if i == "keywords:forbidden_words":
                assert not any(re.search(r"\b" + w + r"\b", keyword, re.IGNORECASE) for w in k["forbidden_words"])


def test_topic_table_is_consistent():
    for _phrase, keyword, tempting in TOPICS:
        assert keyword and len(tempting) >= 2
        assert not any(re.search(r"\b" + w + r"\b", keyword, re.IGNORECASE) for w in tempting)
    with pytest.raises(ConfigError, match="num_test_topics"):
        split_topics(0, 0)
    with pytest.raises(ConfigError, match="num_train"):
        make_prompts(0, 0, 5)
