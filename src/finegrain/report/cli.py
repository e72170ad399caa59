"""``finegrain report RUN_DIR... [--output report.html] [--title ...]``: write the HTML report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]


def build_parser(prog: str = "finegrain report") -> argparse.ArgumentParser:
    """The argument parser of ``finegrain report``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write one self-contained HTML report (metrics table, reward-versus-KL frontier, training "
        "curves, token-credit AUROC and token-reward heatmaps) from one or more run directories.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories to compare")
    parser.add_argument("--output", "-o", type=Path, default=Path("report.html"),
                        help="HTML file to write (default: report.html)")
    parser.add_argument("--title", default="finegrain report", help="page title (default: finegrain report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``finegrain report``; print the written report's path and return 0 (a user's error is printed in one
    line by the ``finegrain`` dispatcher, as for every command)."""
    args = build_parser().parse_args(argv)
    # Imported here so that `--help` does not pay for matplotlib and torch.
    from finegrain.report.html import build_report

    print(build_report(args.run_dirs, args.output, title=args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
