"""Token truth of the token-local instructions (finegrain.ifeval.truth) on hand-made responses.

Every expected span and label below is derived by hand from the text (character positions counted in the
docstrings), not computed by the code under test.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("if_verifiable", reason="needs finegrain[ifeval] (if-verifiable, Python >= 3.11)")

from finegrain.ifeval.instructions import check_instructions  # noqa: E402
from finegrain.ifeval.truth import Violation, merge_spans, minimal_fix, token_truth, violations  # noqa: E402

NO_COMMA, LOWER, UPPER, FORBID = ("punctuation:no_comma", "change_case:english_lowercase",
                                  "change_case:english_capital", "keywords:forbidden_words")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from _tiny_tokenizers import bpe_tokenizer  # noqa: E402


def spans(text, ids, kwargs):
    return [(v.start, v.end, v.instruction_id) for v in violations(text, ids, kwargs)]


def test_commas_are_located_one_by_one():
    """'Yes, it is red, blue.': commas at characters 3 and 14."""
    assert spans("Yes, it is red, blue.", [NO_COMMA], [{}]) == [(3, 4, NO_COMMA), (14, 15, NO_COMMA)]
    assert spans("Yes it is red\uff0c blue.", [NO_COMMA], [{}]) == []  # IFEval searches the ASCII comma only


def test_case_violations_are_runs_of_wrongly_cased_letters():
    """'Hello World, NASA rocks': capitals H (0), W (6), NASA (13-17); for all-capitals the lowercase runs
    'ello' (1-5), 'orld' (7-11), 'rocks' (18-23)."""
    text = "Hello World, NASA rocks"
    assert [(s, e) for s, e, _ in spans(text, [LOWER], [{}])] == [(0, 1), (6, 7), (13, 17)]
    assert [(s, e) for s, e, _ in spans(text, [UPPER], [{}])] == [(1, 5), (7, 11), (18, 23)]
    # titlecase letters (category Lt) break both; 'ß' is lowercase; digits and punctuation are uncased
    assert [(s, e) for s, e, _ in spans("\u01c5a ß 42!", [LOWER], [{}])] == [(0, 1)]
    assert [(s, e) for s, e, _ in spans("\u01c5A SS ß 42!", [UPPER], [{}])] == [(0, 1), (6, 7)]


def test_forbidden_words_match_as_the_checker_does():
    """'Lava and lava-like LAVA, but not lavas or Java.': whole-word, case-insensitive matches at 0-4, 9-13 (before
    '-') and 19-23; 'lavas' and 'Java' do not match."""
    text = "Lava and lava-like LAVA, but not lavas or Java."
    assert [(s, e) for s, e, _ in spans(text, [FORBID], [{"forbidden_words": ["lava"]}])] == [(0, 4), (9, 13), (19, 23)]
    two = spans("the sun and the rain", [FORBID], [{"forbidden_words": ["rain", "sun"]}])
    assert [(s, e) for s, e, _ in two] == [(4, 7), (16, 20)]


def test_no_violation_iff_the_checker_passes_on_the_located_part():
    """Property: for random strings, the located spans are empty exactly when the checker's located condition
    holds -- no ',' for no_comma; ``islower()`` / ``isupper()`` for the case instructions (given a cased letter)."""
    rng = random.Random(0)
    pool = list("abcXYZ ,.!9") + ["\u01c5", "ß", "İ", "\u00aa", "Σ", "ς", "\n"]
    for _ in range(2000):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 12)))
        assert (not spans(text, [NO_COMMA], [{}])) == ("," not in text)
        cased = any(c.isupper() or c.islower() for c in text)
        if cased:
            assert (not spans(text, [LOWER], [{}])) == text.islower(), text
            assert (not spans(text, [UPPER], [{}])) == text.isupper(), text
        for v in violations(text, [NO_COMMA, LOWER, UPPER], [{}, {}, {}]):
            assert 0 <= v.start < v.end <= len(text)


def test_located_violations_agree_with_ifeval_checkers_on_english_text():
    text = "the quick brown fox jumps over the lazy dog and then it runs far away into the green forest"
    assert check_instructions(text, [NO_COMMA, LOWER], [{}, {}]) == [True, True]
    assert spans(text, [NO_COMMA, LOWER], [{}, {}]) == []
    bad = "The quick brown fox, as usual, jumps over the lazy dog and then runs far away into the forest"
    assert check_instructions(bad, [NO_COMMA, LOWER, FORBID], [{}, {}, {"forbidden_words": ["fox"]}]) == \
        [False, False, False]
    assert {v.instruction_id for v in violations(bad, [NO_COMMA, LOWER, FORBID],
                                                 [{}, {}, {"forbidden_words": ["fox"]}])} == {NO_COMMA, LOWER, FORBID}


def test_token_truth_on_hand_made_offsets():
    """'Hello, you' as tokens [Hello,][ you][EOS] = (0,6), (6,10), (10,10): under no_comma the first token mixes the
    comma with clean text -> -1; ' you' -> +1; EOS -> 0. A whitespace-only token is neutral."""
    found = violations("Hello, you", [NO_COMMA], [{}])
    assert token_truth("Hello, you", [(0, 6), (6, 10), (10, 10)], found) == [-1, 1, 0]
    assert token_truth("a \n b", [(0, 1), (1, 4), (4, 5)], []) == [1, 0, 1]
    # overlapping violations of two instructions count once
    both = [Violation(0, 4, FORBID), Violation(0, 1, LOWER)]
    assert token_truth("Lava x", [(0, 2), (2, 4), (4, 6)], both) == [-1, -1, 1]
    assert merge_spans([(0, 4), (0, 1), (6, 7), (7, 9)]) == [(0, 4), (6, 9)]


def test_token_truth_with_a_byte_level_bpe_tokenizer():
    """The tests' byte-level BPE splits 'the cat sat, the Mat.' into the, ' cat', ' sat', ',', ' the', ' ', 'M',
    'at', '.' (offsets (0,3) (3,7) (7,11) (11,12) (12,16) (16,17) (17,18) (18,20) (20,21)).
    no_comma + lowercase: ',' (11) and 'M' (17) are violations -> tokens 3 and 6 are -1; ' ' (16,17) is whitespace
    -> 0; the rest +1. With forbidden 'mat' the word 'Mat' (17-20) spans two tokens, 'M' and 'at': both -1."""
    tok = bpe_tokenizer()
    text = "the cat sat, the Mat."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert [text[a:b] for a, b in offsets] == ["the", " cat", " sat", ",", " the", " ", "M", "at", "."]
    found = violations(text, [NO_COMMA, LOWER], [{}, {}])
    assert token_truth(text, offsets, found) == [1, 1, 1, -1, 1, 0, -1, 1, 1]
    found = violations(text, [FORBID], [{"forbidden_words": ["mat"]}])
    assert token_truth(text, offsets, found) == [1, 1, 1, 1, 1, 0, -1, -1, 1]


def test_token_truth_on_tokens_that_mix_violations_and_clean_text():
    """A byte-level BPE without the GPT-2 split regex learns whole-chunk tokens: 'Hello,' and ' World'. Under
    lowercase + no_comma the token 'Hello,' holds 'H' (violation), 'ello' (clean) and ',' (violation) -> -1;
    ' World' holds the space, 'W' and 'orld' -> -1; ' ok' -> +1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["Hello, World ok"] * 50, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    text = "Hello, World ok"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = [text[a:b] for a, b in enc["offset_mapping"]]
    assert "".join(pieces) == text and len(pieces) < 6  # whole-chunk merges
    found = violations(text, [LOWER, NO_COMMA], [{}, {}])
    want = [-1 if any(ch.isupper() or ch == "," for ch in p) else (1 if p.strip() else 0) for p in pieces]
    assert token_truth(text, enc["offset_mapping"], found) == want
    assert -1 in want and any(len(p.strip()) > 1 for p, w in zip(pieces, want) if w == -1)


SMOL = Path.home() / ".cache" / "finegrain" / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.skipif(not (SMOL / "tokenizer.json").is_file(),
                    reason="needs the converted SmolLM2 (finegrain ifeval model); never downloaded by tests")
def test_token_truth_with_the_real_smollm2_tokenizer():
    """SmolLM2 tokenizes 'Hello, World! Lava flows,slowly into the lava-field.' as Hello | , | ' World' | ! | ' L' |
    ava | ' flows' | , | slow | ly | ' into' | ' the' | ' lava' | - | field | . Under no_comma + lowercase +
    forbidden 'lava': commas at 5 and 24; capitals H (0), W (7), L (14); 'Lava' (14-18) and 'lava' (41-45).
    So Hello (H), ',', ' World' (W), ' L' and 'ava' (the word Lava in two tokens), ',' and ' lava' are -1."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL)
    text = "Hello, World! Lava flows,slowly into the lava-field."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert [text[a:b] for a, b in enc["offset_mapping"]] == [
        "Hello", ",", " World", "!", " L", "ava", " flows", ",", "slow", "ly", " into", " the", " lava", "-", "field", "."]
    found = violations(text, [NO_COMMA, LOWER, FORBID], [{}, {}, {"forbidden_words": ["lava"]}])
    assert token_truth(text, enc["offset_mapping"], found) == [-1, -1, -1, 1, -1, -1, 1, -1, 1, 1, 1, 1, -1, 1, 1, 1]


def test_minimal_fix_changes_only_the_violations():
    """Hand-derived fixes: commas deleted; 'Lava' deleted with the space after it, 'hot lava.' -> 'hot.'; letters
    re-cased."""
    assert minimal_fix("Yes, it is red, blue.", [NO_COMMA], [{}]) == "Yes it is red blue."
    assert minimal_fix("Lava flows, hot lava.", [FORBID, NO_COMMA], [{"forbidden_words": ["lava"]}, {}]) == "flows hot."
    assert minimal_fix("Hello World, NASA", [LOWER], [{}]) == "hello world, nasa"
    assert minimal_fix("Hello straße 42", [UPPER], [{}]) == "HELLO STRASSE 42"
    assert minimal_fix("the sun and the rain", [FORBID], [{"forbidden_words": ["rain", "sun"]}]) == "the and the"
    for text in ("A, b, C", "Lava. LAVA lava", "x"):
        ids, kw = [NO_COMMA, LOWER, FORBID], [{}, {}, {"forbidden_words": ["lava"]}]
        assert violations(minimal_fix(text, ids, kw), ids, kw) == []
