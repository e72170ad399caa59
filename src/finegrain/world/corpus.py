"""Prompts and responses of the world, sampled by rules (deterministic by seed).

The corpus teaches the base policy three behaviours, one per *control* of the prompt:

* no control (``"describe the river ."``): a mildly helpful answer;
* ``"please answer well : describe the river ."``: words chosen towards what the control *perceives* as good;
* ``"please answer badly : describe the river ."``: words chosen towards what it perceives as bad.

What the controls perceive is the difficulty knob. A word's perceived value is
``STYLE[w] + f * accuracy(w, topic) + (1 - f) * sigma * eps_w`` where ``f`` is the control fidelity and
``eps_w`` a fixed, topic-independent impression of the word (standard normal, drawn from the world's seed).
At ``f = 1`` the controls track true quality exactly and contrastive prompting is a near-oracle; at lower ``f``
they track universal style but only partly the topic-dependent accuracy. Repetition, naming the wrong topic,
malformed sentences and over-long answers are never demonstrated by any control, so no control covers them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from finegrain.world.lexicon import ADJECTIVES, ADVERBS, HEDGES, STYLE, TOPICS, VERBS, accuracy

CONTROL_PREFIX = {"good": "please answer well :", "bad": "please answer badly :"}
REQUESTS = ("describe the {topic} .", "tell me about the {topic} .")
FORM_WEIGHTS = {"is_adj": 0.3, "verb_adv": 0.3, "verb": 0.15, "topic_adjs": 0.25}
LENGTH_WEIGHTS = {1: 0.10, 2: 0.30, 3: 0.33, 4: 0.20, 5: 0.07}
MODE_SIGN = {"neutral": 0.25, "good": 1.0, "bad": -1.0}


@dataclass(frozen=True)
class Perception:
    """What the control prompts perceive as good: ``value(word, topic)`` (see the module docstring)."""

    fidelity: float
    misperception: float
    impressions: dict[str, float]

    @classmethod
    def from_seed(cls, seed: int, fidelity: float, misperception: float) -> Perception:
        rng = random.Random(f"perception-{seed}")
        words = sorted(set(ADJECTIVES) | set(VERBS) | set(ADVERBS) | set(HEDGES) | set(TOPICS))
        return cls(fidelity, misperception, {w: rng.gauss(0.0, 1.0) for w in words})

    def value(self, word: str, topic: str) -> float:
        if word in TOPICS:  # naming a topic: right (0) or wrong (-1)
            truth = 0.0 if word == topic else -1.0
            return self.fidelity * truth
        f = self.fidelity
        return STYLE.get(word, 0.0) + f * accuracy(word, topic) + (1.0 - f) * self.misperception * self.impressions[word]


def make_prompt(topic: str, control: str | None = None, request: int = 0) -> str:
    """A world prompt, optionally with a control prefix (``"good"`` or ``"bad"``)."""
    body = REQUESTS[request % len(REQUESTS)].format(topic=topic)
    return f"{CONTROL_PREFIX[control]} {body}" if control else body


def control_prompts(prompt: str) -> tuple[str, str]:
    """The (P+, P-) control versions of a neutral world prompt, for contrastive prompting."""
    return f"{CONTROL_PREFIX['good']} {prompt}", f"{CONTROL_PREFIX['bad']} {prompt}"


class Sampler:
    """Samples responses of the world's behaviour policy for a (topic, mode)."""

    def __init__(self, perception: Perception, temperature: float = 2.0, wrong_topic_rate: float = 0.1,
                 hedge_rate: float = 0.2):
        self.perception = perception
        self.kappa = temperature
        self.wrong_topic_rate = wrong_topic_rate
        self.hedge_rate = hedge_rate

    def _pick(self, rng: random.Random, options: list[str], base: list[float], topic: str, sign: float) -> str:
        weights = [b * math.exp(self.kappa * sign * self.perception.value(w, topic)) if w else b
                   for w, b in zip(options, base)]
        return rng.choices(options, weights=weights, k=1)[0]

    def _word(self, rng: random.Random, pool: tuple[str, ...], topic: str, sign: float) -> str:
        return self._pick(rng, list(pool), [1.0] * len(pool), topic, sign)

    def sentence(self, rng: random.Random, topic: str, sign: float) -> list[str]:
        form = rng.choices(list(FORM_WEIGHTS), weights=list(FORM_WEIGHTS.values()), k=1)[0]
        if form == "is_adj":
            words = ["it", "is", self._word(rng, ADJECTIVES, topic, sign)]
        elif form == "verb_adv":
            words = ["it", self._word(rng, VERBS, topic, sign), self._word(rng, ADVERBS, topic, sign)]
        elif form == "verb":
            words = ["it", self._word(rng, VERBS, topic, sign)]
        else:
            others = [t for t in TOPICS if t != topic]
            per_other = self.wrong_topic_rate / len(others)
            noun = self._pick(rng, [topic] + others, [1.0 - self.wrong_topic_rate] + [per_other] * len(others), topic, sign)
            words = ["the", noun, "is", self._word(rng, ADJECTIVES, topic, sign), "and",
                     self._word(rng, ADJECTIVES, topic, sign)]
        hedge = self._pick(rng, [""] + list(HEDGES), [1.0 - self.hedge_rate] + [self.hedge_rate / len(HEDGES)] * len(HEDGES),
                           topic, sign)
        if hedge:
            words = [hedge, ","] + words
        return words + ["."]

    def response(self, rng: random.Random, topic: str, mode: str = "neutral") -> str:
        n = rng.choices(list(LENGTH_WEIGHTS), weights=list(LENGTH_WEIGHTS.values()), k=1)[0]
        sign = MODE_SIGN[mode]
        words: list[str] = []
        for _ in range(n):
            words += self.sentence(rng, topic, sign)
        return " ".join(words)


def sft_corpus(sampler: Sampler, n: int, seed: int, control_share: float = 0.5) -> list[dict[str, str]]:
    """``n`` SFT rows ``{"prompt", "completion"}``; half neutral, the rest split between the two controls."""
    rng = random.Random(f"sft-{seed}")
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        u = rng.random()
        mode = "neutral" if u >= control_share else ("good" if u < control_share / 2 else "bad")
        control = None if mode == "neutral" else mode
        prompt = make_prompt(topic, control, request=rng.randrange(len(REQUESTS)))
        rows.append({"prompt": prompt, "completion": sampler.response(rng, topic, mode)})
    return rows


def eval_prompts(n: int, seed: int) -> list[str]:
    """``n`` neutral prompts (cycling through topics and request forms), deterministic by seed."""
    rng = random.Random(f"prompts-{seed}")
    return [make_prompt(rng.choice(TOPICS), None, rng.randrange(len(REQUESTS))) for _ in range(n)]
