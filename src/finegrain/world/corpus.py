"""Prompts and responses of the world, sampled by rules (deterministic by seed).

The corpus teaches the base policy three behaviours, one per *control* of the prompt:

* no control (``"describe the river ."``): a mildly helpful answer;
* ``"please answer well : describe the river ."``: words chosen towards what the control *perceives* as good;
* ``"please answer badly : describe the river ."``: words chosen towards what it perceives as bad;

and two *revision requests* about a draft answer (T-REG's revision form of contrastive prompting, Zhou et al., ACL
2025, arXiv 2412.02685; docs/methods/treg.md):

* ``"please improve : describe the river . draft : it is dry ."``: the draft with the words perceived as bad
  (mostly) replaced by words perceived as better (``"it is deep ."``), every other word copied;
* ``"please worsen : describe the river . draft : it is deep ."``: the same the other way round.

What the controls and the revisions perceive is the difficulty knob. A word's perceived value is
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

from finegrain.world.grammar import ROLE_ADJ, ROLE_ADV, ROLE_HEDGE, ROLE_TOPIC, ROLE_VERB, parse_response
from finegrain.world.lexicon import ADJECTIVES, ADVERBS, HEDGES, STYLE, TOPICS, VERBS, accuracy

CONTROL_PREFIX = {"good": "please answer well :", "bad": "please answer badly :"}
REVISION_REQUEST = {"good": "please improve : {prompt} draft : {draft}", "bad": "please worsen : {prompt} draft : {draft}"}
"""The revision requests of the SFT corpus, in the placeholder syntax of
:class:`finegrain.rewards.contrastive.ContrastiveTemplate`'s ``draft`` form."""
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


def revision_prompt(prompt: str, draft: str, direction: str) -> str:
    """The request to revise ``draft`` (an answer to ``prompt``) for the better (``"good"``) or worse (``"bad"``)."""
    return REVISION_REQUEST[direction].replace("{prompt}", prompt).replace("{draft}", draft)


def revision_prompts(prompt: str, draft: str) -> tuple[str, str]:
    """The (P+, P-) revision requests of ``draft``: T-REG's revision form on the world."""
    return revision_prompt(prompt, draft, "good"), revision_prompt(prompt, draft, "bad")


_EDIT_POOLS = {ROLE_ADJ: ADJECTIVES, ROLE_VERB: VERBS, ROLE_ADV: ADVERBS, ROLE_HEDGE: HEDGES, ROLE_TOPIC: TOPICS}


def perceived_revision(perception: Perception, rng: random.Random, topic: str, draft: str, direction: str,
                       kappa: float = 2.0) -> str:
    """``draft`` revised towards what the controls perceive as better (``direction="good"``) or worse (``"bad"``):
    each slot of a well-formed sentence (adjective, verb, adverb, hedge, topic noun) is edited on its own with
    probability ``σ(∓κ v)`` (``v`` = :meth:`Perception.value` of its word; ``∓``: ``−`` to improve, ``+`` to
    worsen), by a strictly better (worse) word of its kind not yet in the response, drawn with weight ``exp(±κ v')``;
    every other word is copied.

    So a word perceived as bad is replaced by an improving reviser and kept by a worsening one, and the other way
    round; a model that has learnt this scores a kept draft word ``y_t`` with ``log p(y_t | improve) −
    log p(y_t | worsen) = log σ(κ v) − log σ(−κ v) = κ v``, the perceived value itself (T-REG's revision form,
    docs/methods/treg.md). Substitutions only: the revision keeps the draft's length and every function word. Like
    the controls, it never fixes or introduces repetition, malformed sentences or over-long answers.
    """
    sign = MODE_SIGN[direction]
    words = draft.split()
    used = set(words)
    for sentence in parse_response(list(words)):
        if not sentence.well_formed:
            continue
        for j, role in enumerate(sentence.roles):
            if role not in _EDIT_POOLS:
                continue
            i, pool = sentence.start + j, _EDIT_POOLS[role]
            v = perception.value(words[i], topic)
            if rng.random() >= 1.0 / (1.0 + math.exp(kappa * sign * v)):
                continue
            better = [w for w in pool if (w not in used or pool is TOPICS) and w != words[i]
                      and sign * (perception.value(w, topic) - v) > 0]
            if better:
                weights = [math.exp(kappa * sign * perception.value(w, topic)) for w in better]
                words[i] = rng.choices(better, weights=weights, k=1)[0]
                used.add(words[i])
    return " ".join(words)


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


DRAFT_MODES = {"neutral": 0.5, "good": 0.25, "bad": 0.25}


def revision_corpus(sampler: Sampler, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` SFT rows ``{"prompt", "completion"}`` teaching the revision requests: a draft (an answer of a random
    mode, :data:`DRAFT_MODES`) in a ``please improve`` or ``please worsen`` request (half each), and its
    :func:`perceived_revision` as the completion."""
    rng = random.Random(f"revisions-sft-{seed}")
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = make_prompt(topic, None, request=rng.randrange(len(REQUESTS)))
        mode = rng.choices(list(DRAFT_MODES), weights=list(DRAFT_MODES.values()), k=1)[0]
        draft = sampler.response(rng, topic, mode)
        direction = "good" if rng.random() < 0.5 else "bad"
        revised = perceived_revision(sampler.perception, rng, topic, draft, direction, sampler.kappa)
        rows.append({"prompt": revision_prompt(prompt, draft, direction), "completion": revised})
    return rows


def eval_prompts(n: int, seed: int) -> list[str]:
    """``n`` neutral prompts (cycling through topics and request forms), deterministic by seed."""
    rng = random.Random(f"prompts-{seed}")
    return [make_prompt(rng.choice(TOPICS), None, rng.randrange(len(REQUESTS))) for _ in range(n)]
