"""The built-in synthetic world: rules, oracle with exact token credit, reviser, tokenizer, base model, data sets.

See :mod:`finegrain.world.oracle` for the score and credit, :mod:`finegrain.world.corpus` for the control prompts
and the difficulty knob, :mod:`finegrain.world.build` for the directory layout, and docs/world.md for the story.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from finegrain.world.config import WORLD_FORMAT, WorldConfig, load_world_config
from finegrain.world.oracle import OracleRules, judge, prompt_topic

__all__ = ["OracleRules", "WorldConfig", "default_world_dir", "ensure_world", "judge", "load_world_config",
           "prompt_topic"]


def default_world_dir(cfg: WorldConfig | None = None) -> Path:
    """``$FINEGRAIN_HOME/world-<seed>-<difficulty>`` (default home: ``~/.cache/finegrain``)."""
    cfg = cfg or WorldConfig()
    home = Path(os.environ.get("FINEGRAIN_HOME", Path.home() / ".cache" / "finegrain"))
    return home / f"world-{cfg.seed}-{cfg.difficulty}"


def is_built(world_dir: str | Path) -> bool:
    """True when ``world_dir`` holds a complete world of the current :data:`WORLD_FORMAT`."""
    info = Path(world_dir) / "world.json"
    if not (info.is_file() and (Path(world_dir) / "sft" / "config.json").is_file()):
        return False
    try:
        return json.loads(info.read_text()).get("format") == WORLD_FORMAT
    except (OSError, ValueError):
        return False


def ensure_world(world_dir: str | Path | None = None, cfg: WorldConfig | None = None, *, quiet: bool = False) -> Path:
    """Return a built world directory, building it first if needed (one builder at a time, by a file lock)."""
    path = Path(world_dir) if world_dir else default_world_dir(cfg)
    if is_built(path):
        return path
    path.mkdir(parents=True, exist_ok=True)
    with (path / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not is_built(path):
                from finegrain.world.build import build_world

                if not quiet:
                    stale = " (it holds an older version)" if (path / "world.json").is_file() else ""
                    print(f"building the built-in world in {path}{stale} (once; about a minute on 2 cores)", flush=True)
                summary = build_world(path, cfg or WorldConfig(), show_progress=not quiet)
                if not quiet:
                    print(format_summary(summary), flush=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def format_summary(summary: dict) -> str:
    sft = summary["sft"]
    return "\n".join([
        f"world built in {summary['seconds']} s: vocabulary {summary['vocab_size']} words",
        f"  data: {summary['sft_examples']} SFT rows, {summary['pairs_train']} train / {summary['pairs_test']} test pairs, "
        f"{summary['revisions']} revisions, {summary['credit_examples']} credit examples, "
        f"{summary['prompts_rl']} RL prompts",
        f"  SFT model: mean oracle reward {sft['mean_reward']:.3f}, well-formed {100 * sft['well_formed_rate']:.1f}%, "
        f"{sft['mean_words']:.1f} words per response, final SFT loss {sft.get('final_loss', float('nan')):.3f}",
        f"  pair labels agree with the oracle on {100 * summary['pair_label_agreement']:.1f}% of untied test pairs",
    ])

