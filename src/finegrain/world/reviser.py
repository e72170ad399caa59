"""The world's reviser: a minimal edit of a response that raises its oracle score.

One edit is the smallest change that fixes one fault:

* substitute one adjective / verb / adverb with a good word of the same kind not yet used in the response (the best
  one, or a random good one when a random generator is given);
* substitute a wrong topic noun with the prompt's topic;
* delete a hedge together with its comma;
* delete a malformed sentence, or a sentence beyond the length limit.

``revise`` applies the single edit with the largest score gain (ties: fewer words changed, then earlier
position), repeated up to ``max_edits`` times while each edit still raises the score. It plays the role that an
LLM annotator plays for real data (TLCR, minimal-edit token reward models).

``register_reviser_backend`` makes it the backend ``world`` of ``finegrain label revise`` (:class:`WorldReviser`).
"""

from __future__ import annotations

import random
from pathlib import Path

from finegrain.world.grammar import (
    ROLE_ADJ,
    ROLE_ADV,
    ROLE_HEDGE,
    ROLE_TOPIC,
    ROLE_VERB,
    parse_response,
    split_words,
)
from finegrain.world.lexicon import ADJECTIVES, ADVERBS, VERBS, word_value
from finegrain.world.oracle import DEFAULT_RULES, OracleRules, judge, prompt_topic

_POOLS = {ROLE_ADJ: ADJECTIVES, ROLE_VERB: VERBS, ROLE_ADV: ADVERBS}


def _candidates(words: list[str], topic: str, rules: OracleRules, rng: random.Random | None
                ) -> list[tuple[int, list[str]]]:
    """(number of words changed, edited words) for every single minimal edit."""
    out: list[tuple[int, list[str]]] = []
    used = set(words)
    for k, sent in enumerate(parse_response(words)):
        a, b = sent.start, sent.start + len(sent.words)
        if not sent.well_formed or k >= rules.max_sentences:
            out.append((b - a, words[:a] + words[b:]))
            continue
        for j, role in enumerate(sent.roles):
            i = a + j
            if role in _POOLS:
                unused = [w for w in _POOLS[role] if w not in used]
                good = [w for w in unused if word_value(w, topic) > 0]
                if rng is not None and good:
                    out.append((1, words[:i] + [rng.choice(good)] + words[i + 1 :]))
                elif unused:
                    best = max(unused, key=lambda w: word_value(w, topic))
                    out.append((1, words[:i] + [best] + words[i + 1 :]))
            elif role == ROLE_TOPIC and words[i] != topic:
                out.append((1, words[:i] + [topic] + words[i + 1 :]))
            elif role == ROLE_HEDGE:
                out.append((2, words[:i] + words[i + 2 :]))
    return out


def revise(prompt: str, response: str, max_edits: int = 1, rules: OracleRules = DEFAULT_RULES,
           rng: random.Random | None = None) -> str | None:
    """Return a minimally edited ``response`` with a higher score, or None when no edit raises it.

    Without ``rng`` a substituted word is the best unused word of its kind (deterministic); with ``rng`` it is drawn
    among the unused words of its kind that are good for the topic, so that revisions show many good words rather
    than the same best one.
    """
    topic = prompt_topic(prompt)
    words = split_words(response)
    current = judge(prompt, response, rules).score
    edited = False
    for _ in range(max_edits):
        best: tuple[float, int, int, list[str]] | None = None
        for order, (changed, cand) in enumerate(_candidates(words, topic, rules, rng)):
            gain = judge(prompt, " ".join(cand), rules).score - current
            key = (gain, -changed, -order)
            if gain > 1e-9 and (best is None or key > best[:3]):
                best = (gain, -changed, -order, cand)
        if best is None:
            break
        words = best[3]
        current += best[0]
        edited = True
    return " ".join(words) if edited else None


# ------------------------------------------------------------------------------- the `finegrain label revise` backend


class WorldReviser:
    """:func:`revise` as a reviser of ``finegrain label revise`` (docs/labeling.md): no LLM, no marker.

    ``run(jobs)`` yields ``(job, revised, None)`` per job, in order; a response no edit improves comes back as it is
    (counted as unchanged).
    """

    def __init__(self, rules: OracleRules | None = None, max_edits: int = 2):
        self.rules = rules if rules is not None else DEFAULT_RULES
        self.max_edits = max_edits

    def run(self, jobs):
        from finegrain.labeling.revisers import conversation_text

        for job in jobs:
            out = revise(conversation_text(job.prompt), job.rejected, max_edits=self.max_edits, rules=self.rules)
            yield job, (job.rejected if out is None else out), None


def register_reviser_backend(world_dir: str | Path | None = None) -> None:
    """Register ``--reviser world``: :class:`WorldReviser` with the rules and ``revision_max_edits`` of
    ``world_dir`` (else of the config's ``world_dir``, else the defaults); ``--max_edits`` overrides the latter."""
    from finegrain.errors import ConfigError
    from finegrain.labeling.revisers import register_reviser
    from finegrain.world.config import WorldConfig, load_world_config

    def make(cfg) -> WorldReviser:
        if any(getattr(cfg, name, None) for name in ("model_name_or_path", "model", "base_url")):
            raise ConfigError("--reviser world uses the world's rule-based reviser: drop --model_name_or_path, "
                              "--model and --base_url, or choose --reviser hf / openai")
        world = world_dir or getattr(cfg, "world_dir", None)  # no world.json there: the default world's settings
        wcfg = load_world_config(world) if world and (Path(world) / "world.json").is_file() else WorldConfig()
        return WorldReviser(wcfg.rules, getattr(cfg, "max_edits", None) or wcfg.revision_max_edits)

    register_reviser("world", make, "the built-in world's rule reviser (no LLM; --max_edits)")
