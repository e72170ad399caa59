"""The commands that read a config: parse it, let an application fill what the user left out, run the library.

Each command's config dataclass (the trainer's, eval's, a labeller's) is the single source of its YAML keys, flags
and ``--help``. This layer adds the built-in world's ``--world_dir`` to it and lets the world fill in its model,
data and settings when the user names none (:func:`finegrain.world.app.prepare`); the library below never imports
an application. :func:`command_config` is the same step for Python callers and tests.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from typing import Any

from finegrain.config import dispatch

__all__ = ["command_config", "eval_command", "label", "po", "ppo", "rm", "sft"]

_ON_WORLD = {
    "sft": "With no model and no data set, trains the built-in world's base model from scratch on the world's corpus.",
    "po": "With no model and no data set, trains the built-in world's SFT model on the world's preference pairs "
          "(held-out: its test pairs).",
    "rm": "With no model and no data set, trains on the built-in world, starting from its SFT model.",
    "ppo": "With no model and no data set, trains the built-in world's SFT model on its RL prompts with the world's "
           "oracle as the reward and the judge.",
    "eval": "With no --prompts, runs on the built-in world: its held-out prompts, its SFT model as the reference, its "
            "oracle as the judge. Metric definitions: docs/evaluation.md.",
    "label contrastive": "With no model and no data set, labels the built-in world's training pairs with the world's "
                         "SFT model and its control prompts.",
    "label edits": "With no data set, labels the built-in world's revisions with its tokenizer.",
    "label revise": "With --reviser world (the default without a model or endpoint), revises with the built-in "
                    "world's rule reviser.",
}


def command_config(command: str, cls: type, argv: list[str] | None, description: str | None = None) -> Any:
    """Parse ``argv`` into ``cls`` plus ``--world_dir``, then let the world fill its defaults (module docstring)."""
    from finegrain.world.app import parse_config

    doc = description if description is not None else (cls.__doc__ or "")
    if command in _ON_WORLD:
        doc = f"{doc}\n\n{_ON_WORLD[command]}"
    cfg = parse_config(command, cls, argv, doc)
    if getattr(cfg, "disable_tqdm", False):  # before any model is loaded: quiet means quiet
        from finegrain.trainers.loop import quiet_library_progress_bars

        quiet_library_progress_bars()
    from finegrain.ifeval.sources import register as register_ifeval  # the IFEval task's reward kind 'ifeval'

    register_ifeval()
    return cfg


def _train(command: str, argv: list[str] | None = None) -> int:
    """``finegrain sft|po|rm|ppo``: parse ``finegrain.trainers.<command>``'s config (``SFTConfig``, ...), load its
    inputs and train."""
    trainer = importlib.import_module(f"finegrain.trainers.{command}")
    cfg = command_config(command, getattr(trainer, f"{command.upper()}Config"), argv)
    if command == "rm":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        trainer.train(cfg, trainer.load_inputs(cfg))
    else:
        trainer.train(cfg, *trainer.load_inputs(cfg))
    return 0


sft, po, rm, ppo = (functools.partial(_train, command) for command in ("sft", "po", "rm", "ppo"))


def eval_command(argv: list[str] | None = None) -> int:
    from finegrain.eval import cli

    cfg = command_config("eval", cli.EvalConfig, list(sys.argv[1:] if argv is None else argv))
    cli.run(cfg)
    return 0


def _label_contrastive(argv: list[str]) -> int:
    from finegrain.labeling import contrastive

    contrastive.run_contrastive(command_config("label contrastive", contrastive.ContrastiveLabelConfig, argv))
    return 0


def _label_edits(argv: list[str]) -> int:
    from finegrain.labeling import edits

    cfg = command_config("label edits", edits.EditsConfig, argv, edits.DESCRIPTION)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(edits.run_edits(cfg), file=sys.stdout)
    return 0


def _label_revise(argv: list[str]) -> int:
    from finegrain.labeling import revise

    cfg = command_config("label revise", revise.ReviseConfig, argv, revise.DESCRIPTION)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for transport in ("httpx", "httpx2"):  # the openai SDK's HTTP clients log every request at INFO
        logging.getLogger(transport).setLevel(logging.WARNING)
    print(revise.run_revise(cfg), file=sys.stdout)
    return 0


LABEL_COMMANDS = {
    "revise": (_label_revise, "minimal-edit revisions of rejected responses by an LLM (local HF chat model, "
                              "OpenAI-compatible endpoint) or a registered rule reviser (the built-in world's)"),
    "contrastive": (_label_contrastive, "per-token rewards by contrastive prompting (T-REG): log-prob differences "
                                        "under opposite prompts"),
    "edits": (_label_edits, "token labels from {prompt, rejected, revised} rows by edit alignment (TLCR, minimal-edit "
                            "token RM)"),
}
"""Sub-command of ``finegrain label`` -> (runner, one line of help)."""


def label(argv: list[str] | None = None) -> int:
    """``finegrain label <sub-command> ...``: usage, then the sub-command's runner."""
    usage = "\n".join(["usage: finegrain label <sub-command> [--config file.yaml] [--option value ...]",
                       "       finegrain label <sub-command> --help", "", "sub-commands:",
                       *(f"  {name:<12} {doc}" for name, (_, doc) in LABEL_COMMANDS.items())])
    return dispatch("finegrain label", argv, {name: run for name, (run, _) in LABEL_COMMANDS.items()}, usage)
