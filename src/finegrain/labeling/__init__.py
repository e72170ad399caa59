"""``finegrain label <sub-command>``: make fine-grained supervision from preference data.

Sub-commands (each in its own module, imported only when it runs):

* ``revise``: minimal-edit revisions of rejected responses by an LLM (or the built-in world's reviser);
* ``contrastive``: per-token rewards by contrastive prompting (T-REG);
* ``edits``: token labels from revisions by token-level edit alignment (TLCR, minimal-edit token RM).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys

__all__ = ["SUBCOMMANDS", "available", "main"]

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "revise": (
        "finegrain.labeling.revise",
        "minimal-edit revisions of rejected responses by an LLM (local HF chat model, OpenAI-compatible "
        "endpoint) or the world's reviser",
    ),
    "contrastive": (
        "finegrain.labeling.contrastive",
        "per-token rewards by contrastive prompting (T-REG): log-prob differences under opposite prompts",
    ),
    "edits": (
        "finegrain.labeling.edits",
        "token labels from {prompt, rejected, revised} rows by edit alignment (TLCR, minimal-edit token RM)",
    ),
}
"""Sub-command name -> (module with a ``main(argv)``, one line of help)."""


def available(name: str) -> bool:
    """Whether the module of sub-command ``name`` is present in this installation."""
    try:
        return importlib.util.find_spec(SUBCOMMANDS[name][0]) is not None
    except (KeyError, ImportError):
        return False


def _usage() -> str:
    lines = [
        "usage: finegrain label <sub-command> [--config file.yaml] [--option value ...]",
        "       finegrain label <sub-command> --help",
        "",
        "sub-commands:",
    ]
    for name, (_, doc) in SUBCOMMANDS.items():
        note = "" if available(name) else " (not available in this version)"
        lines.append(f"  {name:<12} {doc}{note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``finegrain label <sub-command> ...``; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"finegrain label: unknown sub-command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    if not available(name):
        ready = ", ".join(n for n in SUBCOMMANDS if available(n)) or "none"
        print(
            f"finegrain label: the sub-command '{name}' is not available in this version of finegrain "
            f"(available: {ready})\n\n{_usage()}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)
