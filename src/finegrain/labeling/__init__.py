"""``finegrain label <sub-command>``: make fine-grained supervision from preference data.

Sub-commands (each in its own module, imported only when it runs):

* ``revise``: minimal-edit revisions of rejected responses by an LLM (or the built-in world's reviser);
* ``contrastive``: per-token rewards by contrastive prompting (T-REG);
* ``edits``: token labels from revisions by token-level edit alignment (TLCR, minimal-edit token RM).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable

__all__ = ["SUBCOMMANDS", "dispatch"]

SUBCOMMANDS: dict[str, str] = {
    "revise": "minimal-edit revisions of rejected responses by an LLM (local HF chat model, OpenAI-compatible "
              "endpoint) or a registered rule reviser (the built-in world's)",
    "contrastive": "per-token rewards by contrastive prompting (T-REG): log-prob differences under opposite prompts",
    "edits": "token labels from {prompt, rejected, revised} rows by edit alignment (TLCR, minimal-edit token RM)",
}
"""Sub-command name -> one line of help (the runners live in :mod:`finegrain.cli.commands`)."""


def _usage() -> str:
    lines = [
        "usage: finegrain label <sub-command> [--config file.yaml] [--option value ...]",
        "       finegrain label <sub-command> --help",
        "",
        "sub-commands:",
    ]
    lines += [f"  {name:<12} {doc}" for name, doc in SUBCOMMANDS.items()]
    return "\n".join(lines)


def dispatch(argv: list[str], runners: dict[str, Callable[[list[str]], int]]) -> int:
    """Run ``finegrain label <sub-command> ...`` with ``runners[sub-command]``; return the exit status."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"finegrain label: unknown sub-command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(runners[name](rest) or 0)
