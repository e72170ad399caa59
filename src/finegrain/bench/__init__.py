"""``finegrain bench``: speed and memory benchmarks, every figure a ratio measured side by side in one run.

One module per benchmark, each with ``run(**kwargs) -> dict`` (see :mod:`finegrain.bench.table` for the result's
layout) and ``main(argv)`` (the scripts under ``bench/`` call it); :mod:`finegrain.bench.cli` runs a selection of
them and writes their results.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``finegrain bench [names...] [--quick] [--out DIR] [--device cpu|cuda] [--threads N]``."""
    from finegrain.bench.cli import main as _main

    return _main(argv)
