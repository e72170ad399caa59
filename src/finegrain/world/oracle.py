"""The oracle: a score for any (prompt, response) and the ground-truth credit of every word.

The score is *defined* as the sum of per-word credits, so the credit decomposes the score exactly:
``sum(judge(prompt, response).credit) == judge(prompt, response).score``.

Credit of a word in a well-formed sentence within the length limit (docs/world.md tabulates it with examples): an
adjective, verb or adverb earns ``STYLE[w] + accuracy(w, topic)``, or ``repeat_penalty`` instead when the word already
appeared earlier in the response; a hedge ``STYLE[w]`` (negative); a topic noun 0 when it names the prompt's topic,
``wrong_topic_penalty`` otherwise; a function word 0.

A malformed sentence earns no credit: each of its words carries ``malformed_penalty / len(sentence)``, so
broken text cannot farm reward. Sentences beyond ``max_sentences`` earn no credit either and carry
``overlong_penalty`` spread the same way. An empty response scores 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from finegrain.world.grammar import CONTENT_ROLES, ROLE_HEDGE, ROLE_TOPIC, parse_response, split_words
from finegrain.world.lexicon import STYLE, TOPICS, word_value

_TOPIC_SET = frozenset(TOPICS)


@dataclass(frozen=True)
class OracleRules:
    """Penalties and limits of the oracle (part of the world's configuration)."""

    max_sentences: int = 4
    repeat_penalty: float = -0.5
    wrong_topic_penalty: float = -1.0
    malformed_penalty: float = -1.0
    overlong_penalty: float = -0.5


DEFAULT_RULES = OracleRules()


@dataclass(frozen=True)
class Judgement:
    """What the oracle says about one response.

    Attributes:
        score: the response's score (``sum(credit)``).
        words: the response's words.
        credit: one float per word.
        well_formed: every sentence parses and the response is non-empty.
        num_sentences: sentences counted (a trailing fragment counts as one).
    """

    score: float
    words: list[str]
    credit: list[float]
    well_formed: bool
    num_sentences: int


def prompt_topic(prompt: str) -> str:
    """The topic a world prompt asks about (its last topic word).

    Raises:
        ValueError: the prompt names no topic of the world.
    """
    topics = [w for w in split_words(prompt) if w in _TOPIC_SET]
    if not topics:
        raise ValueError(f"prompt names no topic of the world: {prompt!r}")
    return topics[-1]


def judge(prompt: str, response: str, rules: OracleRules = DEFAULT_RULES) -> Judgement:
    """Score ``response`` to ``prompt`` and attribute the score to its words (see the module docstring)."""
    topic = prompt_topic(prompt)
    words = split_words(response)
    credit = [0.0] * len(words)
    seen: set[str] = set()
    sentences = parse_response(words)
    for k, sent in enumerate(sentences):
        n = len(sent.words)
        if k >= rules.max_sentences or not sent.well_formed:
            penalty = rules.overlong_penalty if k >= rules.max_sentences else rules.malformed_penalty
            for j in range(n):
                credit[sent.start + j] = penalty / n
            continue
        for j, (w, role) in enumerate(zip(sent.words, sent.roles)):
            i = sent.start + j
            if role in CONTENT_ROLES:
                credit[i] = rules.repeat_penalty if w in seen else word_value(w, topic)
                seen.add(w)
            elif role == ROLE_HEDGE:
                credit[i] = STYLE[w]
            elif role == ROLE_TOPIC:
                credit[i] = 0.0 if w == topic else rules.wrong_topic_penalty
    well_formed = bool(sentences) and all(s.well_formed for s in sentences)
    return Judgement(
        score=float(sum(credit)), words=words, credit=credit, well_formed=well_formed,
        num_sentences=len(sentences),
    )
