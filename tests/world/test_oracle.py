"""The world's oracle on hand-checked examples.

Prompt topic "winter": fits {cold, white, dark, quiet, freezes, sleeps, howls}, clashes
{hot, green, sandy, bright, blooms, shines, grows}; style values: lovely +1, gently +0.5, maybe -0.5,
basically -1, boring -1.
"""

import pytest

from finegrain.world.grammar import parse_response
from finegrain.world.oracle import OracleRules, judge, prompt_topic

P = "describe the winter ."


def test_well_formed_credit_by_hand():
    # it(0) is(0) cold(+1) .(0) it(0) freezes(+1) gently(+0.5) .(0)  -> 2.5
    j = judge(P, "it is cold . it freezes gently .")
    assert j.credit == [0, 0, 1.0, 0, 0, 1.0, 0.5, 0]
    assert j.score == 2.5 and j.well_formed and j.num_sentences == 2


def test_context_dependent_word():
    # "hot" clashes with winter and fits summer; "lovely" is good for both
    assert judge(P, "it is hot .").score == -1.0
    assert judge("describe the summer .", "it is hot .").score == 1.0
    assert judge(P, "it is lovely .").score == judge("describe the summer .", "it is lovely .").score == 1.0


def test_hedge_repeat_and_wrong_topic():
    # maybe(-0.5) ,(0) it is cold(+1) . it is cold(repeat -0.5) .
    j = judge(P, "maybe , it is cold . it is cold .")
    assert j.credit == [-0.5, 0, 0, 0, 1.0, 0, 0, 0, -0.5, 0]
    # the summer(wrong topic -1) is cold(+1) and white(+1) .
    assert judge(P, "the summer is cold and white .").credit == [0, -1.0, 0, 1.0, 0, 1.0, 0]
    assert judge(P, "the winter is cold and white .").score == 2.0


def test_malformed_sentence_earns_penalty_and_no_credit():
    # "it is is cold ." is malformed: 5 words share -1; the good second sentence still counts
    j = judge(P, "it is is cold . it is white .")
    assert j.credit[:5] == [pytest.approx(-0.2)] * 5
    assert j.credit[5:] == [0, 0, 1.0, 0]
    assert not j.well_formed
    # a trailing fragment without "." is malformed too, and cannot farm credit from "cold"
    j = judge(P, "it is white . it is cold")
    assert j.credit[4:] == [pytest.approx(-1 / 3)] * 3 and not j.well_formed
    # garbage words are malformed
    assert judge(P, "cold cold cold cold .").score == pytest.approx(-1.0)


def test_overlong_responses_are_penalised():
    text = "it is cold . it sleeps . it is white . it is quiet . it is dark ."
    j = judge(P, text)
    assert j.credit[-4:] == [pytest.approx(-0.125)] * 4
    assert j.score == pytest.approx(4 - 0.5)
    assert judge(P, text, OracleRules(max_sentences=5)).score == 5.0


def test_credit_sums_to_score_on_random_text():
    import random

    from finegrain.world.lexicon import vocabulary

    rng = random.Random(0)
    words = [w for w in vocabulary() if not w.startswith("<")]
    for _ in range(300):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 25)))
        j = judge(P, text)
        assert sum(j.credit) == pytest.approx(j.score)
        assert len(j.credit) == len(j.words)


def test_empty_response_and_prompt_topic():
    assert judge(P, "").score == 0.0 and not judge(P, "").well_formed
    assert prompt_topic("please answer well : tell me about the ocean .") == "ocean"
    with pytest.raises(ValueError, match="no topic"):
        prompt_topic("hello there")


def test_grammar_forms():
    forms = [s.form for s in parse_response("it is cold . it roars . it flows gently . the fox is wild and fast . perhaps , it sleeps .".split())]
    assert forms == ["is_adj", "verb", "verb_adv", "topic_adjs", "verb"]
    assert parse_response("it is gently .".split())[0].form is None  # adverb in an adjective slot


def test_lexicon_tables_are_consistent():
    # (was a check run when finegrain.world.lexicon was imported)
    from finegrain.world.lexicon import CLASHES, DESCRIPTIVE_ADJECTIVES, FITS, TOPICS, VERBS

    for topic in TOPICS:
        overlap = FITS[topic] & CLASHES[topic]
        assert not overlap, f"{topic}: words both fit and clash: {sorted(overlap)}"
        unknown = (FITS[topic] | CLASHES[topic]) - set(DESCRIPTIVE_ADJECTIVES) - set(VERBS)
        assert not unknown, f"{topic}: unknown words {sorted(unknown)}"
