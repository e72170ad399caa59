"""Collators: tokenized examples -> :class:`~finegrain.types.CompletionBatch` / :class:`~finegrain.types.PreferenceBatch`.

The layout is the one of :mod:`finegrain.types`: prompts **left**-padded to ``P`` (the longest prompt), responses
**right**-padded to ``T`` (the longest response), ``completion_mask`` True on real response tokens including EOS.
In a preference batch of ``B`` pairs the ``N = 2B`` rows are the chosen responses ``[0, B)`` then the rejected
responses ``[B, 2B)``, each with its pair's prompt.

Worked example (pad id 0, BOS 1, EOS 2), two pairs::

    pair 0: prompt [1, 5, 6]  chosen [7, 8, 2]   rejected [9, 2]
    pair 1: prompt [1, 5]     chosen [10, 2]     rejected [11, 12, 13, 2]

>>> examples = [
...     {"prompt_input_ids": [1, 5, 6], "chosen_input_ids": [7, 8, 2], "rejected_input_ids": [9, 2]},
...     {"prompt_input_ids": [1, 5], "chosen_input_ids": [10, 2], "rejected_input_ids": [11, 12, 13, 2]},
... ]
>>> batch = collate_preferences(examples, pad_token_id=0)
>>> batch.prompt_input_ids          # (N=4, P=3): chosen 0, chosen 1, rejected 0, rejected 1
tensor([[1, 5, 6],
        [0, 1, 5],
        [1, 5, 6],
        [0, 1, 5]])
>>> batch.prompt_attention_mask
tensor([[1, 1, 1],
        [0, 1, 1],
        [1, 1, 1],
        [0, 1, 1]])
>>> batch.completion_input_ids      # (N=4, T=4)
tensor([[ 7,  8,  2,  0],
        [10,  2,  0,  0],
        [ 9,  2,  0,  0],
        [11, 12, 13,  2]])
>>> batch.completion_mask.int()
tensor([[1, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1]], dtype=torch.int32)

The model input of row 1 is then ``[0, 1, 5 | 10, 2, 0, 0]`` with attention ``[0, 1, 1 | 1, 1, 0, 0]``; the
state at column ``P - 1 + t`` predicts ``completion_input_ids[:, t]``.

**Extras** (``batch.extras``), each with first dimension ``N`` so that a batch can be cut into row groups:

* per token, ``(N, T)``: ``token_labels`` (padded with :data:`~finegrain.data.tokenize.IGNORE_INDEX` = -100;
  long when every label is an integer, else float32), ``token_rewards`` and ``ref_token_logps`` (float32, padded
  with 0). Preference examples give them as ``chosen_*`` / ``rejected_*``.
* per row, ``(N,)``: ``ref_logps`` (float32; from ``ref_chosen_logps`` / ``ref_rejected_logps`` in preference
  batches, chosen rows first), ``margin`` (float32; the pair's margin repeated on its chosen and rejected rows),
  ``truncated`` (bool), ``index`` (long; the example's position in its data set, repeated on both rows of a pair).

An extra is present when every example has it; when only some do, that is an error (it would be padded with
values that look real).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from finegrain.data.tokenize import IGNORE_INDEX
from finegrain.errors import ConfigError
from finegrain.types import CompletionBatch, PreferenceBatch

_PER_TOKEN = {"token_labels": IGNORE_INDEX, "token_rewards": 0.0, "ref_token_logps": 0.0}
_PER_ROW = {"ref_logps": torch.float32, "margin": torch.float32, "truncated": torch.bool, "index": torch.long}


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: ``pad_token_id``, else ``eos_token_id`` (padding is masked out either way)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ConfigError("the tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token")


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _values(examples: Sequence[Mapping], key: str) -> list | None:
    """``[ex[key] for ex in examples]`` when every example has the key, None when none has it."""
    have = [key in ex and ex[key] is not None for ex in examples]
    if not any(have):
        return None
    if not all(have):
        raise ValueError(f"collate: '{key}' is present in some examples and missing in others")
    return [ex[key] for ex in examples]


def _collate(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    per_token: Mapping[str, list | None],
    per_row: Mapping[str, list | None],
    pad_id: int,
    pad_to_multiple_of: int | None,
) -> dict[str, Any]:
    n = len(prompts)
    p = _round_up(max((len(x) for x in prompts), default=0), pad_to_multiple_of)
    t = _round_up(max((len(x) for x in completions), default=0), pad_to_multiple_of)
    prompt_ids = torch.full((n, p), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, p), dtype=torch.long)
    completion_ids = torch.full((n, t), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((n, t), dtype=torch.bool)
    for i, (x, y) in enumerate(zip(prompts, completions)):
        if x:
            prompt_ids[i, p - len(x) :] = torch.as_tensor(x, dtype=torch.long)
            prompt_mask[i, p - len(x) :] = 1
        if y:
            completion_ids[i, : len(y)] = torch.as_tensor(y, dtype=torch.long)
            completion_mask[i, : len(y)] = True
    extras: dict[str, torch.Tensor] = {}
    for name, rows in per_token.items():
        if rows is None:  # no example has it
            continue
        integral = name == "token_labels" and all(isinstance(v, int) for r in rows for v in r)
        dtype = torch.long if integral else torch.float32
        out = torch.full((n, t), _PER_TOKEN[name], dtype=dtype)
        for i, (r, y) in enumerate(zip(rows, completions)):
            if len(r) != len(y):
                raise ValueError(f"collate: row {i} has {len(r)} '{name}' values for {len(y)} response tokens")
            if r:
                out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
        extras[name] = out
    extras.update({k: torch.as_tensor(v, dtype=_PER_ROW[k]) for k, v in per_row.items() if v is not None})
    return dict(prompt_input_ids=prompt_ids, prompt_attention_mask=prompt_mask,
                completion_input_ids=completion_ids, completion_mask=completion_mask, extras=extras)


def collate_completions(
    examples: Sequence[Mapping[str, Any]], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> CompletionBatch:
    """Pad one-response examples (SFT, token supervision, prompt-only, rollouts) into a :class:`CompletionBatch`.

    Args:
        examples: dicts with ``prompt_input_ids`` and ``completion_input_ids`` (lists of ints) and optionally the
            per-token and per-row extras of the module docstring (``token_labels``, ``token_rewards``,
            ``ref_token_logps``, ``ref_logps``, ``margin``, ``truncated``, ``index``).
        pad_token_id: the id written in padded positions.
        pad_to_multiple_of: round ``P`` and ``T`` up to a multiple of this (None: no rounding).

    Returns:
        A :class:`CompletionBatch` with ``N = len(examples)`` rows; prompt-only examples give ``T = 0``.

    Example:
        >>> b = collate_completions([{"prompt_input_ids": [1, 5], "completion_input_ids": [7, 2],
        ...                           "token_labels": [1, -100]},
        ...                          {"prompt_input_ids": [1], "completion_input_ids": [9, 9, 2],
        ...                           "token_labels": [0, 1, -100]}], pad_token_id=0)
        >>> b.prompt_input_ids.tolist(), b.completion_input_ids.tolist()
        ([[1, 5], [0, 1]], [[7, 2, 0], [9, 9, 2]])
        >>> b.extras["token_labels"].tolist()
        [[1, -100, -100], [0, 1, -100]]
    """
    per_token = {k: _values(examples, k) for k in _PER_TOKEN}
    per_row = {k: _values(examples, k) for k in _PER_ROW}
    prompts = [ex["prompt_input_ids"] for ex in examples]
    completions = [ex["completion_input_ids"] for ex in examples]
    return CompletionBatch(**_collate(prompts, completions, per_token, per_row, pad_token_id,
                                      pad_to_multiple_of))


def _both(examples: Sequence[Mapping], chosen_key: str, rejected_key: str) -> list | None:
    """The ``chosen_key`` then the ``rejected_key`` values of every example, or None when none has them."""
    chosen, rejected = _values(examples, chosen_key), _values(examples, rejected_key)
    if (chosen is None) != (rejected is None):
        raise ValueError(f"collate: examples have only one of {chosen_key} / {rejected_key}")
    return None if chosen is None else chosen + rejected


def collate_preferences(
    examples: Sequence[Mapping[str, Any]], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> PreferenceBatch:
    """Pad preference pairs into a :class:`PreferenceBatch`: chosen rows ``[0, B)``, rejected rows ``[B, 2B)``.

    Args:
        examples: ``B`` dicts with ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` and optionally
            ``chosen_/rejected_`` + ``token_labels`` / ``token_rewards`` / ``ref_token_logps`` / ``truncated``,
            ``ref_chosen_logps`` / ``ref_rejected_logps``, ``margin``, ``index``.
        pad_token_id: the id written in padded positions.
        pad_to_multiple_of: round ``P`` and ``T`` up to a multiple of this (None: no rounding).

    Returns:
        A :class:`PreferenceBatch` of ``N = 2B`` rows (the worked example is in the module docstring).
    """
    prompts = [ex["prompt_input_ids"] for ex in examples]
    per_token = {k: _both(examples, f"chosen_{k}", f"rejected_{k}") for k in _PER_TOKEN}
    per_row = {"ref_logps": _both(examples, "ref_chosen_logps", "ref_rejected_logps"),
               "truncated": _both(examples, "chosen_truncated", "rejected_truncated")}
    for key in ("margin", "index"):  # one value per pair, on both of its rows
        per_row[key] = None if (v := _values(examples, key)) is None else v + v
    completions = [ex["chosen_input_ids"] for ex in examples] + [ex["rejected_input_ids"] for ex in examples]
    return PreferenceBatch(**_collate(prompts + prompts, completions, per_token, per_row, pad_token_id,
                                      pad_to_multiple_of))

