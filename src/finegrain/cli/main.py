"""``finegrain <command> [options]``: one entry point, one config dataclass per command.

Each command's module is imported only when that command runs, so ``finegrain --help`` is instant.
Errors that the user can fix (bad options, bad rows, missing files) are printed as one message without a
traceback; set ``FINEGRAIN_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import functools
import os
import sys

from finegrain import __version__
from finegrain.config import dispatch, load_function

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("finegrain.demo:main", "the whole pipeline on the built-in world, with a report (start here)"),
    "world": ("finegrain.world.cli:main", "build or inspect the built-in synthetic world"),
    "sft": ("finegrain.cli.commands:sft", "supervised fine-tuning"),
    "po": ("finegrain.cli.commands:po",
           "offline preference optimisation: dpo, simpo, tdpo1, tdpo2, treg-dpo, treg-simpo"),
    "rm": ("finegrain.cli.commands:rm", "reward models: sequence, sentence, token, discriminator"),
    "label": ("finegrain.cli.commands:label", "make token-level supervision: contrastive rewards, edit labels, revisions"),
    "ppo": ("finegrain.cli.commands:ppo", "PPO / REINFORCE with dense per-token rewards from any reward source"),
    "eval": ("finegrain.cli.commands:eval_command", "sample from a policy and judge it against its reference"),
    "report": ("finegrain.report.cli:main", "one self-contained HTML report of run directories"),
    "bench": ("finegrain.bench.cli:main", "benchmarks measured side by side (speed and memory ratios)"),
    "ifeval": ("finegrain.ifeval.cli:main",
               "the real-model task: SmolLM2-135M-Instruct, IFEval checkers, exact token truth"),
}
"""Command -> ("module:function" taking argv and returning the exit status, one line of help)."""


def _usage() -> str:
    lines = [
        f"finegrain {__version__}: fine-grained credit assignment for language-model alignment",
        "",
        "usage: finegrain <command> [--config file.yaml] [--option value ...]",
        "       finegrain <command> --help",
        "",
        "commands:",
    ]
    lines += [f"  {name:<8} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "With no model or data set given, every command runs on the built-in world (built on first use)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-V"], ["--version"], ["version"]):
        print(f"finegrain {__version__}")
        return 0
    return dispatch("finegrain", argv, {name: functools.partial(_run, name) for name in COMMANDS}, _usage(), "command")


def _run(name: str, rest: list[str]) -> int:
    """``finegrain <name> rest``: a user's error as one line on stderr (status 1), Ctrl-C as status 130."""
    from finegrain.errors import FinegrainError

    try:
        from finegrain.cli import launch

        if name in launch.LAUNCHABLE and launch.wants_launch(rest):  # --accelerate_config / --num_processes: re-run under `accelerate launch`
            return launch.relaunch(name, rest)
        return load_function(COMMANDS[name][0])(rest)
    except FinegrainError as exc:
        if os.environ.get("FINEGRAIN_DEBUG"):
            raise
        print(f"finegrain {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nfinegrain {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
