"""Sentence grammar of the world: parsing a response into sentences and slots.

A response is a sequence of space-separated words. Sentences end with ``.``; each well-formed sentence is one
of four forms, optionally preceded by a hedge and a comma::

    it is ADJ .                      "it is cold ."
    it VERB ADV .                    "it flows gently ."
    it VERB .                        "it roars ."
    the TOPIC is ADJ and ADJ .       "the river is deep and blue ."
    HEDGE , <any of the above>       "maybe , it is cold ."

Anything else -- a missing word, a word of the wrong kind, words after the last ``.`` -- is malformed.
"""

from __future__ import annotations

from dataclasses import dataclass

from finegrain.world.lexicon import ADJECTIVES, ADVERBS, HEDGES, TOPICS, VERBS

_ADJ, _VERB, _ADV, _HEDGE, _TOPIC = frozenset(ADJECTIVES), frozenset(VERBS), frozenset(ADVERBS), frozenset(HEDGES), frozenset(TOPICS)

# slot roles
ROLE_FUNCTION = "function"
ROLE_ADJ = "adj"
ROLE_VERB = "verb"
ROLE_ADV = "adv"
ROLE_HEDGE = "hedge"
ROLE_TOPIC = "topic"
CONTENT_ROLES = (ROLE_ADJ, ROLE_VERB, ROLE_ADV)

FORMS = ("is_adj", "verb_adv", "verb", "topic_adjs")


@dataclass(frozen=True)
class Sentence:
    """One sentence of a response.

    Attributes:
        start: index of its first word in the response's word list.
        words: its words, including the final ``.`` when present.
        roles: the grammatical role of each word (``None`` for every word when malformed).
        form: which of :data:`FORMS` it is, or ``None`` when malformed.
    """

    start: int
    words: tuple[str, ...]
    roles: tuple[str, ...] | None
    form: str | None

    @property
    def well_formed(self) -> bool:
        return self.form is not None


def _parse_body(body: list[str]) -> tuple[str, tuple[str, ...]] | None:
    f = ROLE_FUNCTION
    if len(body) == 3 and body[0] == "it" and body[1] == "is" and body[2] in _ADJ:
        return "is_adj", (f, f, ROLE_ADJ)
    if len(body) == 3 and body[0] == "it" and body[1] in _VERB and body[2] in _ADV:
        return "verb_adv", (f, ROLE_VERB, ROLE_ADV)
    if len(body) == 2 and body[0] == "it" and body[1] in _VERB:
        return "verb", (f, ROLE_VERB)
    if (
        len(body) == 6 and body[0] == "the" and body[1] in _TOPIC and body[2] == "is"
        and body[3] in _ADJ and body[4] == "and" and body[5] in _ADJ
    ):
        return "topic_adjs", (f, ROLE_TOPIC, f, ROLE_ADJ, f, ROLE_ADJ)
    return None


def parse_sentence(words: list[str], start: int) -> Sentence:
    """Parse one sentence (its words, ending with ``.`` when terminated)."""
    if not words or words[-1] != ".":
        return Sentence(start, tuple(words), None, None)
    body = words[:-1]
    prefix: tuple[str, ...] = ()
    if len(body) >= 2 and body[0] in _HEDGE and body[1] == ",":
        prefix, body = (ROLE_HEDGE, ROLE_FUNCTION), body[2:]
    parsed = _parse_body(body)
    if parsed is None:
        return Sentence(start, tuple(words), None, None)
    form, roles = parsed
    return Sentence(start, tuple(words), prefix + roles + (ROLE_FUNCTION,), form)


def split_words(text: str) -> list[str]:
    """The world's words are separated by whitespace (``.`` and ``,`` are words of their own)."""
    return text.split()


def parse_response(words: list[str]) -> list[Sentence]:
    """Split a response's words into sentences at ``.``; a trailing fragment without ``.`` is a malformed sentence."""
    sentences: list[Sentence] = []
    current: list[str] = []
    start = 0
    for i, w in enumerate(words):
        if not current:
            start = i
        current.append(w)
        if w == ".":
            sentences.append(parse_sentence(current, start))
            current = []
    if current:
        sentences.append(parse_sentence(current, start))
    return sentences
