import random

import pytest

from finegrain.world.corpus import Perception, Sampler, control_prompts, make_prompt, sft_corpus
from finegrain.world.grammar import split_words
from finegrain.world.lexicon import TOPICS, accuracy
from finegrain.world.oracle import judge
from finegrain.world.reviser import revise

P = "describe the winter ."


@pytest.mark.parametrize(
    "response, expected",
    [
        ("it is hot .", "it is cold ."),  # one substitution: the clashing adjective becomes the best unused one
        ("maybe , it is cold .", "it is cold ."),  # delete the hedge and its comma
        ("the summer is cold and white .", "the winter is cold and white ."),  # fix the topic
        ("it is is cold . it is white .", "it is white ."),  # delete the malformed sentence
    ],
)
def test_reviser_single_edit_by_hand(response, expected):
    assert revise(P, response, max_edits=1) == expected
    assert judge(P, expected).score > judge(P, response).score


def test_reviser_edits_are_minimal_and_raise_score():
    sampler = Sampler(Perception.from_seed(0, 0.4, 1.0))
    rng = random.Random(1)
    n_revised = 0
    for _ in range(300):
        topic = rng.choice(TOPICS)
        prompt = make_prompt(topic)
        response = sampler.response(rng, topic, "neutral")
        revised = revise(prompt, response, max_edits=1)
        if revised is None:
            continue
        n_revised += 1
        assert judge(prompt, revised).score > judge(prompt, response).score
        a, b = split_words(response), split_words(revised)
        if len(a) == len(b):  # a substitution changes exactly one word
            assert sum(x != y for x, y in zip(a, b)) == 1
        else:  # a deletion removes a contiguous run (a hedge + comma, or one sentence)
            k = len(a) - len(b)
            assert any(a[:i] + a[i + k :] == b for i in range(len(a)))
    assert n_revised > 200


def test_corpus_is_deterministic_and_controls_follow_perception():
    s = Sampler(Perception.from_seed(0, 1.0, 0.0))
    assert sft_corpus(s, 50, seed=3) == sft_corpus(s, 50, seed=3)
    assert sft_corpus(s, 50, seed=3) != sft_corpus(s, 50, seed=4)
    rng = random.Random(0)
    mean = {m: sum(judge(make_prompt(t), s.response(rng, t, m)).score for t in TOPICS * 40) / 480 for m in ("good", "neutral", "bad")}
    assert mean["good"] > mean["neutral"] > mean["bad"]
    plus, minus = control_prompts("describe the fox .")
    assert plus.endswith("describe the fox .") and "well" in plus and "badly" in minus


def test_fidelity_controls_perception_of_topic_words():
    exact = Perception.from_seed(0, 1.0, 0.0)
    blind = Perception.from_seed(0, 0.0, 1.0)
    for topic in TOPICS:
        for w in ("cold", "flows", "sandy"):
            assert exact.value(w, topic) == accuracy(w, topic)
            # at fidelity 0 the perceived value of a descriptive word is the same for every topic
            assert blind.value(w, topic) == blind.value(w, TOPICS[0])


def test_random_reviser_draws_varied_good_words_and_still_raises_the_score():
    """With a generator, a substitution picks any good unused word of its kind (not always the single best one)."""
    from finegrain.world.lexicon import word_value

    chosen = set()
    for seed in range(40):
        revised = revise(P, "it is hot .", max_edits=1, rng=random.Random(seed))
        word = split_words(revised)[2]
        assert word_value(word, "winter") > 0 and judge(P, revised).score > judge(P, "it is hot .").score
        chosen.add(word)
    assert len(chosen) > 1
    assert revise(P, "it is hot .", max_edits=1, rng=random.Random(3)) == revise(
        P, "it is hot .", max_edits=1, rng=random.Random(3))


def test_make_revisions_sides():
    from finegrain.world.build import make_revisions
    from finegrain.world.oracle import DEFAULT_RULES

    pairs = [{"prompt": P, "chosen": "it is cold . maybe , it is white .", "rejected": "it is hot ."}]
    one = make_revisions(pairs, DEFAULT_RULES, max_edits=2, seed=0, sides="rejected")
    both = make_revisions(pairs, DEFAULT_RULES, max_edits=2, seed=0, sides="both")
    assert [r["rejected"] for r in one] == ["it is hot ."]
    assert [r["rejected"] for r in both] == ["it is hot .", pairs[0]["chosen"]]
    for row in both:
        assert row["chosen"] == pairs[0]["chosen"]
        assert judge(P, row["revised"]).score > judge(P, row["rejected"]).score


def test_a_world_of_another_format_is_not_built(tmp_path):
    import json

    from finegrain.world import is_built
    from finegrain.world.config import WORLD_FORMAT

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text("{}")
    for fmt, expected in ((WORLD_FORMAT, True), (WORLD_FORMAT - 1, False)):
        (tmp_path / "world.json").write_text(json.dumps({"format": fmt}))
        assert is_built(tmp_path) is expected
    (tmp_path / "world.json").write_text("{not json")
    assert is_built(tmp_path) is False


def test_revision_rows_teach_the_revision_requests():
    """World format 3: the SFT corpus teaches T-REG's revision form in world words (docs/world.md): a draft in a
    'please improve / worsen : <prompt> draft : <draft>' request, answered by the draft with words replaced towards
    what the controls perceive as better / worse; function words and length are kept."""
    from finegrain.world.config import WORLD_FORMAT, WorldConfig
    from finegrain.world.corpus import REVISION_REQUEST, perceived_revision, revision_corpus, revision_prompts
    from finegrain.world.grammar import parse_response
    from finegrain.world.lexicon import FUNCTION_WORDS, REVISION_WORDS, vocabulary
    from finegrain.world.oracle import prompt_topic

    assert WORLD_FORMAT >= 3 and set(REVISION_WORDS) <= set(vocabulary())
    assert WorldConfig().revision_rows == 4000 and WorldConfig(sft_examples=10, revision_examples=3).revision_rows == 3
    perception = Perception.from_seed(0, 0.4, 1.0)
    s = Sampler(perception)
    rows = revision_corpus(s, 400, seed=5)
    assert rows == revision_corpus(s, 400, seed=5) and rows != revision_corpus(s, 400, seed=6)
    gain = {"good": [], "bad": []}
    for r in rows:
        head, draft = r["prompt"].split(" draft : ")
        direction = "good" if head.startswith("please improve : ") else "bad"
        prompt = head.split(" : ", 1)[1]
        assert r["prompt"] == revision_prompts(prompt, draft)[0 if direction == "good" else 1]
        assert REVISION_REQUEST[direction].split(" {prompt}")[0] == head.split(" : ")[0] + " :"
        a, b = draft.split(), r["completion"].split()
        assert len(a) == len(b) and all(x == y for x, y in zip(a, b) if x in FUNCTION_WORDS)
        assert all(sent.well_formed for sent in parse_response(b))
        topic = prompt_topic(prompt)
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        gain[direction] += [perception.value(y, topic) - perception.value(x, topic) for x, y in changed]
    # every edit moves the perceived value the asked way; both directions edit
    assert len(gain["good"]) > 100 and min(gain["good"]) > 0
    assert len(gain["bad"]) > 100 and max(gain["bad"]) < 0
    # a word perceived as bad is replaced when improving far more often than when worsening (σ(∓κ v) per slot)
    rng = random.Random(0)
    topic = "winter"
    kept = {d: sum(perceived_revision(perception, rng, topic, "it is cold .", d) == "it is cold ."
                   for _ in range(300)) for d in ("good", "bad")}
    v = perception.value("cold", topic)
    assert (kept["good"] > kept["bad"]) == (v > 0)
