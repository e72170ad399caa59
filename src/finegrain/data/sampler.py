"""Deterministic batch order: a pure function of (number of examples, batch size, seed, epoch).

Nothing here holds state, so resuming is exact: a run stopped after batch ``b`` of epoch ``e`` restarts with
``batch_indices(...)[b + 1:]`` of the same epoch and sees every remaining example once, none twice. Multi-process
runs build the same *global* batches on every rank and each rank takes its contiguous slice
(:func:`shard_batch`), so ``num_processes`` ranks together see exactly the batches of a single-process run, in the
same order, whatever the number of processes.

The permutation of epoch ``e`` comes from ``numpy.random.default_rng([seed, e])`` (a SeedSequence of both numbers),
so epochs are independent and no epoch's order depends on how many epochs came before.
"""

from __future__ import annotations

import numpy as np

from finegrain.errors import ConfigError


def num_batches(num_examples: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch: ``num_examples // batch_size``, plus one for the remainder when ``not drop_last``."""
    _check(num_examples, batch_size)
    full, rest = divmod(num_examples, batch_size)
    return full + (1 if rest and not drop_last else 0)


def _check(num_examples: int, batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")


def batch_indices(
    num_examples: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True, shuffle: bool = True
) -> list[list[int]]:
    """The global batches of one epoch, as lists of example indices.

    Args:
        num_examples: size of the data set.
        batch_size: examples per global batch (across all processes).
        seed: the run's data seed.
        epoch: the 0-based epoch; each epoch has its own permutation.
        drop_last: drop a final batch smaller than ``batch_size`` (its examples are seen in other epochs, in
            other positions).
        shuffle: permute the examples (False: source order).

    Returns:
        ``num_batches(num_examples, batch_size, drop_last)`` lists of indices; the full batches hold
        ``batch_size`` indices each, and no index appears twice.

    Example:
        >>> batch_indices(5, 2, seed=0, epoch=0, shuffle=False, drop_last=False)
        [[0, 1], [2, 3], [4]]
        >>> batch_indices(5, 2, seed=0, epoch=0) == batch_indices(5, 2, seed=0, epoch=0)
        True
    """
    _check(num_examples, batch_size)
    if shuffle:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)
    else:
        order = np.arange(num_examples)
    n = num_batches(num_examples, batch_size, drop_last)
    return [order[i * batch_size : (i + 1) * batch_size].tolist() for i in range(n)]


def shard_batch(indices: list[int], num_processes: int, process_index: int) -> list[int]:
    """The contiguous slice of a global batch that process ``process_index`` of ``num_processes`` takes.

    Rank ``r`` takes ``indices[r * k : (r + 1) * k]`` with ``k = len(indices) / num_processes``. A final short batch
    (``drop_last=False``) that does not divide evenly is split as ``numpy.array_split`` does: the first ranks get
    one index more, and a rank may get none.

    Args:
        indices: one global batch.
        num_processes: number of ranks.
        process_index: this rank, ``0 <= process_index < num_processes``.

    Returns:
        This rank's indices; concatenated over ranks in rank order they are ``indices``.

    Example:
        >>> [shard_batch([7, 3, 9, 1], 2, r) for r in range(2)]
        [[7, 3], [9, 1]]
    """
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ConfigError(f"process_index {process_index} is not a rank of {num_processes} processes")
    base, extra = divmod(len(indices), num_processes)
    start = process_index * base + min(process_index, extra)
    return list(indices[start : start + base + (1 if process_index < extra else 0)])


def check_divisible(batch_size: int, num_processes: int) -> None:
    """Require that a global batch splits evenly over the processes (otherwise per-rank means differ)."""
    if batch_size % num_processes:
        raise ConfigError(
            f"the global batch size ({batch_size}) must be a multiple of the number of processes ({num_processes})"
        )
