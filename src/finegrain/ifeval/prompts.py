"""Prompts of the task: topics x request templates x IFEval instructions, deterministic from a seed.

Every prompt is one user message: a request about a topic ("Write a short blog post about volcanoes."), then, after
a blank line, its instructions in the wording of :data:`finegrain.ifeval.instructions.PHRASES`:

* one or two **token-local** instructions (no commas; all lowercase *or* all capitals; forbidden words, drawn from
  words the topic tempts one to use, e.g. "lava" for volcanoes);
* always the two **content** instructions: at least ``N`` words (``N`` from :data:`WORD_COUNTS`) and the topic's
  keyword, so that an empty or very short answer fails the prompt even when it passes the token-local instructions.

Train and test prompts use disjoint topics (:data:`TOPICS` is split by the seed), so test accuracy measures
instruction following on unseen subjects. Rows are in IFEval's input format (Zhou et al. 2023, arXiv 2311.07911) --
``key``, ``prompt``, ``instruction_id_list``, ``kwargs`` -- except that ``prompt`` is *conversational*
(``[{"role": "user", "content": ...}]``, a TRL prompt-only row), because the model is a chat model and finegrain's
data layer applies the chat template to conversational rows only; IFEval's prompt string is the message's content.
``topic`` and ``split`` are kept for analysis (the data layer ignores them).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from finegrain.errors import ConfigError
from finegrain.ifeval.instructions import (
    CAPITAL,
    FORBIDDEN,
    KEYWORD,
    LOWERCASE,
    NO_COMMA,
    NUM_WORDS,
    describe,
)

__all__ = ["REQUESTS", "TOPICS", "WORD_COUNTS", "make_prompts", "prompt_text", "split_topics"]

TOPICS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (topic phrase, keyword that must appear, words the topic tempts one to use: forbidden-word candidates)
    ("volcanoes", "volcano", ("lava", "eruption", "magma")),
    ("honey bees", "bee", ("honey", "hive", "flowers")),
    ("the ocean", "ocean", ("water", "waves", "fish")),
    ("coffee", "coffee", ("morning", "beans", "cup")),
    ("the moon", "moon", ("night", "earth", "sky")),
    ("dogs", "dog", ("pet", "loyal", "walk")),
    ("rainforests", "forest", ("trees", "rain", "animals")),
    ("bicycles", "bicycle", ("ride", "wheels", "pedal")),
    ("the history of tea", "tea", ("china", "leaves", "drink")),
    ("solar energy", "solar", ("sun", "panels", "power")),
    ("chess", "chess", ("king", "board", "game")),
    ("winter", "winter", ("snow", "cold", "ice")),
    ("libraries", "library", ("books", "read", "quiet")),
    ("gardening", "garden", ("plants", "soil", "grow")),
    ("the internet", "internet", ("online", "computer", "information")),
    ("mountains", "mountain", ("climb", "peak", "high")),
    ("friendship", "friend", ("trust", "together", "people")),
    ("cooking pasta", "pasta", ("water", "sauce", "boil")),
    ("electric cars", "electric", ("battery", "car", "charge")),
    ("the desert", "desert", ("sand", "hot", "dry")),
    ("music", "music", ("song", "sound", "play")),
    ("space travel", "space", ("rocket", "stars", "planet")),
    ("birds", "bird", ("fly", "wings", "nest")),
    ("exercise", "exercise", ("health", "body", "run")),
    ("rivers", "river", ("water", "flow", "fish")),
    ("the city at night", "city", ("lights", "streets", "night")),
    ("trains", "train", ("station", "travel", "tracks")),
    ("recycling", "recycle", ("waste", "plastic", "environment")),
    ("cats", "cat", ("pet", "purr", "whiskers")),
    ("the weather", "weather", ("rain", "sun", "wind")),
    ("school", "school", ("students", "teacher", "learn")),
    ("photography", "photo", ("camera", "light", "picture")),
    ("the farm", "farm", ("animals", "crops", "farmer")),
    ("the beach", "beach", ("sand", "sun", "water")),
    ("robots", "robot", ("machine", "technology", "human")),
    ("bread", "bread", ("flour", "bake", "oven")),
    ("elephants", "elephant", ("trunk", "large", "africa")),
    ("the human heart", "heart", ("blood", "body", "beat")),
    ("autumn", "autumn", ("leaves", "fall", "trees")),
    ("museums", "museum", ("art", "history", "visit")),
    ("sleep", "sleep", ("night", "rest", "dream")),
    ("football", "football", ("team", "ball", "game")),
    ("bridges", "bridge", ("river", "build", "cross")),
    ("chocolate", "chocolate", ("sweet", "cocoa", "eat")),
    ("the printing press", "printing", ("books", "paper", "history")),
    ("airplanes", "airplane", ("fly", "pilot", "sky")),
    ("volunteering", "volunteer", ("help", "community", "people")),
    ("the seasons", "season", ("summer", "winter", "weather")),
)
"""48 topics. No forbidden-word candidate matches inside its topic's keyword as a whole word (IFEval's
``\\bword\\b`` test), so the keyword can always be written without breaking the forbidden-words instruction
("farmer" may be forbidden where "farm" is required)."""

REQUESTS: tuple[str, ...] = (
    "Write a short blog post about {topic}.",
    "Describe {topic} to a friend who knows nothing about it.",
    "Explain the importance of {topic}.",
    "Write a short story that involves {topic}.",
    "Give some practical advice about {topic}.",
    "Write a letter to a child about {topic}.",
    "Write a short essay on {topic}.",
    "Tell me something interesting about {topic}.",
)

WORD_COUNTS: tuple[int, ...] = (30, 40, 50, 60)
"""The ``at least N words`` values (at most 60, so that an answer fits the default 160 new tokens)."""

# The token-local combinations a prompt may carry (all-lowercase and all-capitals conflict; IFEval's
# INSTRUCTION_CONFLICTS says the same).
_COMBOS: tuple[tuple[str, ...], ...] = (
    (NO_COMMA,), (LOWERCASE,), (CAPITAL,), (FORBIDDEN,),
    (NO_COMMA, LOWERCASE), (NO_COMMA, CAPITAL), (NO_COMMA, FORBIDDEN), (LOWERCASE, FORBIDDEN), (CAPITAL, FORBIDDEN),
)


def split_topics(seed: int, num_test_topics: int) -> tuple[list[int], list[int]]:
    """Indices of :data:`TOPICS` for train and test (disjoint, a seeded permutation)."""
    if not 1 <= num_test_topics < len(TOPICS):
        raise ConfigError(f"num_test_topics must be in [1, {len(TOPICS) - 1}], got {num_test_topics}")
    order = list(range(len(TOPICS)))
    random.Random(f"ifeval-topics-{seed}").shuffle(order)
    return sorted(order[num_test_topics:]), sorted(order[:num_test_topics])


def prompt_text(request: str, instruction_id_list: Sequence[str], kwargs: Sequence[dict]) -> str:
    """The user message: the request, a blank line, then the instruction sentences."""
    return request + "\n\n" + " ".join(describe(i, k) for i, k in zip(instruction_id_list, kwargs))


def _one_prompt(rng: random.Random, topic_index: int) -> tuple[str, list[str], list[dict]]:
    phrase, keyword, tempting = TOPICS[topic_index]
    request = rng.choice(REQUESTS).format(topic=phrase)
    ids: list[str] = []
    kwargs: list[dict] = []
    for instruction_id in rng.choice(_COMBOS):
        ids.append(instruction_id)
        if instruction_id == FORBIDDEN:
            kwargs.append({"forbidden_words": sorted(rng.sample(list(tempting), rng.choice((1, 2))))})
        else:
            kwargs.append({})
    ids += [NUM_WORDS, KEYWORD]
    kwargs += [{"num_words": rng.choice(WORD_COUNTS), "relation": "at least"}, {"keywords": [keyword]}]
    return request, ids, kwargs


def make_prompts(seed: int = 0, num_train: int = 256, num_test: int = 128, num_test_topics: int = 12) -> dict[str, list[dict]]:
    """Train and test prompt rows (see the module docstring), the same for the same arguments.

    Args:
        seed: the seed of the topic split and of every choice.
        num_train: train prompts.
        num_test: test prompts.
        num_test_topics: topics held out for the test split.

    Returns:
        ``{"train": rows, "test": rows}``; keys are unique across both splits (train from 0, test from 100000).
    """
    if num_train < 1 or num_test < 1:
        raise ConfigError(f"num_train and num_test must be >= 1, got {num_train} and {num_test}")
    train_topics, test_topics = split_topics(seed, num_test_topics)
    out: dict[str, list[dict]] = {}
    for split, topics, n, base in (("train", train_topics, num_train, 0), ("test", test_topics, num_test, 100000)):
        rng = random.Random(f"ifeval-prompts-{seed}-{split}")
        rows, seen = [], set()
        attempts = 0
        while len(rows) < n:
            attempts += 1
            topic = topics[len(rows) % len(topics)] if attempts <= n else rng.choice(topics)
            request, ids, kwargs = _one_prompt(rng, topic)
            text = prompt_text(request, ids, kwargs)
            if text in seen and attempts < 50 * n:
                continue  # the same prompt twice teaches and measures nothing new
            seen.add(text)
            rows.append({"key": base + len(rows), "prompt": [{"role": "user", "content": text}],
                         "instruction_id_list": ids, "kwargs": kwargs, "topic": TOPICS[topic][0], "split": split})
        out[split] = rows
    return out
