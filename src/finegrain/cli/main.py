"""``finegrain <command> [options]``: one entry point, one config dataclass per command.

Each command's module is imported only when that command runs, so ``finegrain --help`` is instant.
Errors that the user can fix (bad options, bad rows, missing files) are printed as one message without a
traceback; set ``FINEGRAIN_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from finegrain import __version__

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
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(f"finegrain {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"finegrain: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    from finegrain.errors import FinegrainError

    try:
        from finegrain.cli import launch

        if name in launch.LAUNCHABLE and launch.wants_launch(rest):  # --accelerate_config / --num_processes: re-run under `accelerate launch`
            return launch.relaunch(name, rest)
        module_name, _, function = COMMANDS[name][0].partition(":")
        result = getattr(importlib.import_module(module_name), function)(rest)
    except FinegrainError as exc:
        if os.environ.get("FINEGRAIN_DEBUG"):
            raise
        print(f"finegrain {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nfinegrain {name}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
