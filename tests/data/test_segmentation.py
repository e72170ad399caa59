"""Sentence splitting, sentence-to-token mapping and the two SRM boundary modes (docs/methods/reward-models.md)."""

import doctest
import random
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import finegrain.data.segmentation as segmentation
from finegrain.data.segmentation import (
    RuleSplitter,
    SaTSplitter,
    SentenceSplitter,
    insert_end_tokens,
    mark_sentence_ends,
    sentence_token_ends,
    token_sentence_ids,
)
from finegrain.errors import ConfigError, DataError


def sentences(text, splitter=None):
    return [text[s:e] for s, e in (splitter or RuleSplitter()).split(text)]


def assert_well_formed(text, spans):
    """Sorted, disjoint, non-empty, trimmed, and every non-space character in exactly one span."""
    covered = []
    for (s, e), nxt in zip(spans, spans[1:] + [(len(text), len(text))]):
        assert 0 <= s < e <= nxt[0]
        assert not text[s].isspace() and not text[e - 1].isspace()
        covered.extend(range(s, e))
    assert len(covered) == len(set(covered))
    assert {i for i, c in enumerate(text) if not c.isspace()} <= set(covered)


def test_doctests():
    assert doctest.testmod(segmentation, raise_on_error=False).failed == 0


@pytest.mark.parametrize(
    "text, want",
    [
        ("Hello world. How are you? Fine!", ["Hello world.", "How are you?", "Fine!"]),
        ("Dr. Smith met Mrs. Jones. They talked.", ["Dr. Smith met Mrs. Jones.", "They talked."]),
        ("It costs 3.50 dollars. Pi is 3.14159.", ["It costs 3.50 dollars.", "Pi is 3.14159."]),
        ("Use tools, e.g. a hammer. Then stop.", ["Use tools, e.g. a hammer.", "Then stop."]),
        ("J. R. Tolkien wrote it. Really?! Yes...", ["J. R. Tolkien wrote it.", "Really?!", "Yes..."]),
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ("Steps:\n1. Mix it.\n2. Bake it.", ["Steps:", "1. Mix it.", "2. Bake it."]),
        ("It was in 2020. Then it ended.", ["It was in 2020.", "Then it ended."]),
        ("Visit example.com today. Now.", ["Visit example.com today.", "Now."]),
        ("line one\n\nline two", ["line one", "line two"]),
        ("Ok. . Next one.", ["Ok. .", "Next one."]),  # a stray "." is merged, never dropped
        ("  Leading and trailing.  ", ["Leading and trailing."]),
        ("日本語です。次です。 Next. Très bien!", ["日本語です。", "次です。", "Next.", "Très bien!"]),
        ("", []),
        (" \n\t ", []),
    ],
)
def test_rule_splitter_examples(text, want):
    assert sentences(text) == want


def test_rule_splitter_never_loses_characters():
    rng = random.Random(0)
    alphabet = list("abcXY 12.!?\n\"')é日。") + ["Dr.", "e.g.", " ", " "]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        assert_well_formed(text, RuleSplitter().split(text))
        assert_well_formed(text, RuleSplitter(min_chars=5).split(text))


def test_splitters_satisfy_the_protocol():
    assert isinstance(RuleSplitter(), SentenceSplitter)
    assert isinstance(SaTSplitter(object()), SentenceSplitter)


class FakeSaT:
    """Stands in for wtpsplit.SaT: splits after every 'X' and keeps all characters, like SaT does."""

    def __init__(self, pieces=None):
        self.calls, self.pieces = [], pieces

    def split(self, text, threshold):
        self.calls.append(threshold)
        if self.pieces is not None:
            return self.pieces
        return [p + "X" for p in text.split("X")[:-1]] + [text.split("X")[-1]]


def test_sat_splitter_maps_pieces_to_trimmed_spans():
    sat = FakeSaT()
    text = "first bit X second bit X  a third one"
    assert sentences(text, SaTSplitter(sat)) == ["first bit X", "second bit X", "a third one"]
    assert sat.calls == [0.2]
    assert_well_formed(text, SaTSplitter(sat).split(text))


def test_sat_splitter_short_text_and_bad_pieces():
    sat = FakeSaT()
    assert sentences(" aXbXc ", SaTSplitter(sat)) == ["aXbXc"] and sat.calls == []
    with pytest.raises(DataError, match="concatenate"):
        SaTSplitter(FakeSaT(["not the text"])).split("a text longer than ten characters")


def test_sat_from_pretrained_without_wtpsplit(monkeypatch):
    monkeypatch.setitem(sys.modules, "wtpsplit", None)  # makes `import wtpsplit` fail
    with pytest.raises(ConfigError, match="wtpsplit"):
        SaTSplitter.from_pretrained("sat-3l")


def naive_sentence_ids(spans, offsets):
    out = []
    for s, e in offsets:
        ids = [j for j, (a, b) in enumerate(spans) if s < b and a < e and s < e]
        out.append(ids[0] if ids else -1)
    return out


def test_token_mapping_against_naive_loops():
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randrange(0, 40)
        text = "".join(rng.choice("ab. \n") for _ in range(n))
        spans = RuleSplitter(min_chars=1).split(text)
        cuts = sorted(set(rng.sample(range(n + 1), rng.randrange(1, n + 2))))
        offsets = [(a, b) for a, b in zip(cuts, cuts[1:])]
        offsets += [(b, b) for b in rng.sample(cuts, min(2, len(cuts)))]  # empty tokens
        offsets.sort()
        ids = token_sentence_ids(spans, offsets)
        assert ids == naive_sentence_ids(spans, offsets)
        ends = sentence_token_ends(spans, offsets)
        assert ends == [max((t for t, i in enumerate(ids) if i == j), default=-1) for j in range(len(spans))]


def test_token_mapping_hand_example():
    """'Hi there. Bye.' with a tokenizer whose offsets include the leading space (' there', ' Bye')."""
    spans = [(0, 9), (10, 14)]
    offsets = [(0, 2), (2, 8), (8, 9), (9, 13), (13, 14)]
    assert token_sentence_ids(spans, offsets) == [0, 0, 0, 1, 1]
    assert sentence_token_ends(spans, offsets) == [2, 4]
    # A token straddling both sentences belongs to the first; the second has no token of its own.
    assert token_sentence_ids([(0, 3), (4, 6)], [(0, 6)]) == [0]
    assert sentence_token_ends([(0, 3), (4, 6)], [(0, 6)]) == [0, -1]
    assert token_sentence_ids([], [(0, 1)]) == [-1]
    with pytest.raises(DataError):
        token_sentence_ids([(0, 1)], [(2, 1)])


def test_sentence_ends_with_a_real_tokenizer():
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["The cat sat. It purred! Was it happy?"] * 3,
        trainer=trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]"], show_progress=False),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    text = "The cat sat. It purred! Was it happy?"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = RuleSplitter().split(text)
    ends = sentence_token_ends(spans, enc["offset_mapping"])
    assert [enc["offset_mapping"][e][1] for e in ends] == [e for _, e in spans]
    assert ends[-1] == len(enc["input_ids"]) - 1


def test_insert_end_tokens_layout():
    """prompt <END> s_1 <END> s_2 <END> ... s_N EOS <END> (the SRM training layout)."""
    END, EOS = 99, 2
    b = insert_end_tokens([5, 6], [10, 11, 12, 13, 14, EOS], [1, 4], END, EOS)
    assert b.prompt_ids == [5, 6, END]
    assert b.response_ids == [10, 11, END, 12, 13, 14, EOS, END]
    assert b.response_boundaries == [2, 7]
    assert all(b.response_ids[i] == END for i in b.response_boundaries)
    # No EOS: the last <END> closes the last sentence (and any trailing tokens after it).
    assert insert_end_tokens([5], [10, 11, 12], [0, 1], END).response_ids == [10, END, 11, 12, END]
    # No sentence: only the prompt boundary.
    none = insert_end_tokens([5], [EOS], [], END, EOS)
    assert none.prompt_ids == [5, END] and none.response_ids == [EOS] and none.response_boundaries == []


def test_mark_sentence_ends():
    b = mark_sentence_ends([5, 6], [10, 11, 12, 2], [1, 2])
    assert b.prompt_ids == [5, 6] and b.response_ids == [10, 11, 12, 2] and b.response_boundaries == [1, 2]


@pytest.mark.parametrize(
    "prompt, ends, match",
    [([], [0], "prompt"), ([1], [2, 1], "increasing"), ([1], [0, 0], "increasing"), ([1], [5], "index"),
     ([1], [-1], "index")],
)
def test_boundary_modes_reject_bad_input(prompt, ends, match):
    for build in (lambda: insert_end_tokens(prompt, [7, 8, 9], ends, 99), lambda: mark_sentence_ends(prompt, [7, 8, 9], ends)):
        with pytest.raises(DataError, match=match):
            build()


def test_insert_end_tokens_rejects_sentence_ending_on_eos():
    with pytest.raises(DataError, match="EOS"):
        insert_end_tokens([1], [7, 2], [1], 99, eos_token_id=2)
