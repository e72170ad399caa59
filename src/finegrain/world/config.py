"""Configuration of the built-in world (``finegrain world build``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from finegrain.config import check_ranges, option
from finegrain.errors import ConfigError
from finegrain.world.oracle import OracleRules

# difficulty -> (control fidelity, misperception)
DIFFICULTY = {"easy": (1.0, 0.0), "default": (0.4, 1.0), "hard": (0.15, 1.0)}


WORLD_FORMAT = 3
"""Version of the world directory's contents; a directory built with another version is rebuilt on use.
3: the SFT corpus teaches the revision requests (``please improve`` / ``please worsen : <prompt> draft : <response>``)
of T-REG's revision form; three new words."""


@dataclasses.dataclass
class WorldConfig:
    """The built-in world: rules, difficulty, base-model size and data-set sizes."""

    seed: int = option(0, "seed of everything in the world (perception, corpus, model, samples)")
    difficulty: Literal["easy", "default", "hard"] = option(
        "default", "how faithfully the control prompts track true quality: easy = exactly (contrastive prompting "
        "is a near-oracle), default = partly, hard = barely")
    control_fidelity: float | None = option(None, "override the difficulty's control fidelity (0..1)")
    misperception: float | None = option(None, "override the difficulty's misperception scale (>= 0)")
    max_sentences: int = option(4, "sentences beyond this earn no credit and a penalty")
    repeat_penalty: float = option(-0.5, "credit of a content word used again in the same response")
    wrong_topic_penalty: float = option(-1.0, "credit of a topic noun that names the wrong topic")
    malformed_penalty: float = option(-1.0, "penalty of a malformed sentence (spread over its words)")
    overlong_penalty: float = option(-0.5, "penalty of a sentence beyond max_sentences (spread over its words)")
    bt_temperature: float = option(1.0, "label noise of preference pairs: P(a > b) = sigmoid((score_a - score_b) / T)")
    sft_examples: int = option(8000, "answer rows of the SFT corpus (neutral and controlled prompts)")
    revision_examples: int | None = option(
        None, "revision-request rows added to the SFT corpus (please improve / worsen : <prompt> draft : <response>); "
        "default: half of sft_examples")
    sft_steps: int = option(600, "SFT optimizer steps")
    sft_batch_size: int = option(64, "SFT batch size")
    sft_learning_rate: float = option(2e-3, "SFT peak learning rate (cosine decay, 5% warm-up)")
    hidden_size: int = option(128, "base model hidden size")
    num_layers: int = option(2, "base model layers")
    num_heads: int = option(4, "base model attention heads")
    train_prompts: int = option(2000, "prompts for training preference pairs (two samples each)")
    test_prompts: int = option(300, "prompts for held-out pairs, token-credit ground truth and evaluation")
    rl_prompts: int = option(2000, "prompts for online RL")
    max_new_tokens: int = option(40, "longest sampled response")
    temperature: float = option(1.0, "sampling temperature of the pairs")
    revision_max_edits: int = option(4, "most edits the reviser makes to one response (each row draws 1..this many)")
    revision_sides: str = option("both", "responses the reviser edits: rejected (of each training pair) or both")

    def __post_init__(self) -> None:
        f = self.fidelity
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"control_fidelity must be in [0, 1], got {f}")
        if self.revision_sides not in ("rejected", "both"):
            raise ConfigError(f"revision_sides must be 'rejected' or 'both', got {self.revision_sides!r}")
        check_ranges(self, nonnegative=("misperception", "revision_examples"), positive=(
            "revision_max_edits", "bt_temperature", "sft_examples", "sft_steps", "sft_batch_size", "train_prompts",
            "test_prompts", "max_new_tokens", "max_sentences", "hidden_size", "num_layers", "num_heads"))
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")

    @property
    def revision_rows(self) -> int:
        """Revision-request rows of the SFT corpus (``revision_examples``, default half of ``sft_examples``)."""
        return self.sft_examples // 2 if self.revision_examples is None else self.revision_examples

    @property
    def fidelity(self) -> float:
        return DIFFICULTY[self.difficulty][0] if self.control_fidelity is None else self.control_fidelity

    @property
    def misperception_scale(self) -> float:
        return DIFFICULTY[self.difficulty][1] if self.misperception is None else self.misperception

    @property
    def rules(self) -> OracleRules:
        """The oracle's rules: the fields of :class:`OracleRules`, as set here."""
        return OracleRules(**{f.name: getattr(self, f.name) for f in dataclasses.fields(OracleRules)})


def load_world_config(world_dir: str | Path) -> WorldConfig:
    """The :class:`WorldConfig` recorded in ``world_dir/world.json``.

    Raises:
        ConfigError: the file is not a world summary finegrain can read.
    """
    meta = Path(world_dir) / "world.json"
    try:
        return WorldConfig(**json.loads(meta.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{meta} is not a world summary finegrain can read ({e}); rebuild the world") from None
