"""The world's vocabulary and the ground truth of what every word is worth.

The world is a small descriptive domain: a prompt asks to describe a *topic* ("describe the river ."), and a
response is a few short sentences about it ("it is deep . it flows gently ."). Quality has three parts:

* **style** -- evaluative adjectives, adverbs and hedges carry a *universal* value (``STYLE``), the same for
  every topic ("lovely" is good, "basically" is bad);
* **accuracy** -- descriptive adjectives and verbs carry a *topic-dependent* value (``FITS`` / ``CLASHES``):
  "cold" is right for winter and wrong for summer, "flows" is right for a river and wrong for a castle;
* **form** -- malformed sentences, repeated words, naming the wrong topic and over-long answers are penalised
  by the oracle (see :mod:`finegrain.world.oracle`); no control prompt demonstrates these.

All tables are plain data so that tests and docs can quote them.
"""

from __future__ import annotations

TOPICS: tuple[str, ...] = (
    "fox", "river", "storm", "castle", "garden", "winter",
    "summer", "ocean", "desert", "forest", "city", "mountain",
)

DESCRIPTIVE_ADJECTIVES: tuple[str, ...] = (
    "cold", "hot", "wet", "dry", "tall", "green", "loud", "quiet", "dark",
    "bright", "old", "wild", "deep", "fast", "white", "blue", "sandy", "calm",
)
EVALUATIVE_ADJECTIVES: tuple[str, ...] = ("lovely", "vivid", "beautiful", "nice", "fine", "boring", "ugly", "bad")
ADJECTIVES: tuple[str, ...] = DESCRIPTIVE_ADJECTIVES + EVALUATIVE_ADJECTIVES

VERBS: tuple[str, ...] = (
    "flows", "roars", "grows", "stands", "shines", "freezes", "runs",
    "sleeps", "shifts", "blooms", "howls", "crumbles", "waits",
)
ADVERBS: tuple[str, ...] = ("gently", "softly", "clearly", "slowly", "quickly", "often", "loudly", "badly")
HEDGES: tuple[str, ...] = ("maybe", "perhaps", "basically", "honestly")

# Function words of the sentence grammar and of prompts.
FUNCTION_WORDS: tuple[str, ...] = ("it", "is", "the", "and", ".", ",")
REQUEST_WORDS: tuple[str, ...] = ("describe", "tell", "me", "about")
CONTROL_WORDS: tuple[str, ...] = ("please", "answer", "well", "badly", ":")
# Words of the revision requests ("please improve : <prompt> draft : <response>"; finegrain.world.corpus).
REVISION_WORDS: tuple[str, ...] = ("improve", "worsen", "draft")

# Universal (topic-independent) value of style words.
STYLE: dict[str, float] = {
    "lovely": 1.0, "vivid": 0.5, "beautiful": 0.5, "nice": 0.0, "fine": 0.0,
    "boring": -1.0, "ugly": -0.5, "bad": -1.0,
    "gently": 0.5, "softly": 0.5, "clearly": 0.5, "slowly": 0.0, "quickly": 0.0, "often": 0.0,
    "loudly": -0.5, "badly": -1.0,
    "maybe": -0.5, "perhaps": -0.5, "basically": -1.0, "honestly": -0.5,
}

# Topic-dependent value: +1 for a word that fits the topic, -1 for one that clashes, 0 otherwise.
FITS: dict[str, frozenset[str]] = {
    "fox": frozenset({"wild", "fast", "quiet", "runs", "sleeps", "howls"}),
    "river": frozenset({"wet", "deep", "fast", "blue", "calm", "flows", "shines", "runs"}),
    "storm": frozenset({"loud", "dark", "wet", "wild", "fast", "roars", "howls", "shifts"}),
    "castle": frozenset({"old", "tall", "dark", "stands", "waits", "crumbles"}),
    "garden": frozenset({"green", "quiet", "bright", "calm", "grows", "blooms", "sleeps"}),
    "winter": frozenset({"cold", "white", "dark", "quiet", "freezes", "sleeps", "howls"}),
    "summer": frozenset({"hot", "bright", "green", "dry", "shines", "blooms", "grows"}),
    "ocean": frozenset({"deep", "blue", "wet", "wild", "roars", "shines", "shifts"}),
    "desert": frozenset({"hot", "dry", "sandy", "bright", "quiet", "shines", "shifts", "waits"}),
    "forest": frozenset({"green", "dark", "quiet", "old", "wild", "tall", "grows", "sleeps"}),
    "city": frozenset({"loud", "tall", "bright", "fast", "runs", "shines", "roars"}),
    "mountain": frozenset({"tall", "cold", "old", "white", "stands", "waits", "freezes"}),
}
CLASHES: dict[str, frozenset[str]] = {
    "fox": frozenset({"tall", "deep", "blue", "sandy", "flows", "crumbles", "blooms"}),
    "river": frozenset({"dry", "sandy", "tall", "old", "stands", "sleeps", "crumbles"}),
    "storm": frozenset({"quiet", "calm", "dry", "bright", "sleeps", "blooms", "waits"}),
    "castle": frozenset({"fast", "wet", "sandy", "blue", "flows", "runs", "blooms"}),
    "garden": frozenset({"loud", "dark", "sandy", "dry", "roars", "howls", "crumbles"}),
    "winter": frozenset({"hot", "green", "sandy", "bright", "blooms", "shines", "grows"}),
    "summer": frozenset({"cold", "white", "dark", "wet", "freezes", "sleeps", "howls"}),
    "ocean": frozenset({"dry", "sandy", "tall", "quiet", "stands", "crumbles", "grows"}),
    "desert": frozenset({"wet", "cold", "green", "blue", "flows", "freezes", "blooms"}),
    "forest": frozenset({"sandy", "dry", "blue", "white", "flows", "roars", "shifts"}),
    "city": frozenset({"quiet", "calm", "wild", "sandy", "sleeps", "blooms", "freezes"}),
    "mountain": frozenset({"fast", "hot", "sandy", "wet", "runs", "flows", "blooms"}),
}

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")


def vocabulary() -> list[str]:
    """Every token of the world tokenizer, specials first, in a fixed order (ids are positions)."""
    words = (
        SPECIAL_TOKENS + TOPICS + ADJECTIVES + VERBS + ADVERBS + HEDGES
        + FUNCTION_WORDS + REQUEST_WORDS + CONTROL_WORDS + REVISION_WORDS
    )
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)  # "badly" is both an adverb and a control word
    return list(seen)


def accuracy(word: str, topic: str) -> float:
    """Topic-dependent value of ``word`` for ``topic``: +1 fits, -1 clashes, 0 otherwise."""
    if word in FITS[topic]:
        return 1.0
    if word in CLASHES[topic]:
        return -1.0
    return 0.0


def word_value(word: str, topic: str) -> float:
    """True value of a content word for a topic: universal style value plus topic-dependent accuracy."""
    return STYLE.get(word, 0.0) + accuracy(word, topic)

