"""``finegrain bench``: speed and memory benchmarks, every figure a ratio measured side by side in one run.

One module per benchmark, each with ``run(**kwargs) -> dict`` (see :mod:`finegrain.bench.table` for the result's
layout) and ``main(argv)`` (the scripts under ``bench/`` call it); :mod:`finegrain.bench.cli` (its ``main`` is
``finegrain bench``) runs a selection of them and writes their results.
"""
