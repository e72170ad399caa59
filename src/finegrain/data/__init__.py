"""Loading, validation, tokenization, collation and batch order of alignment data.

Pipeline: :func:`load_rows` (a hub id, local files, a ``datasets`` object or a list of dicts) ->
:func:`validate_rows` (TRL column formats, one :class:`~finegrain.errors.DataError` per bad row, or counted skips)
-> :func:`tokenize_rows` (prompt + response tokens, character offsets, truncation) -> :func:`collate_preferences` /
:func:`collate_completions` (the batch layout of :mod:`finegrain.types`). :class:`PreferenceData` and
:class:`CompletionData` run the whole pipeline and yield batches in a seeded, resumable, shardable order
(:func:`batch_indices`, :func:`shard_batch`).
"""

from finegrain.data.collate import collate_completions, collate_preferences, pad_token_id
from finegrain.data.loading import Rows, load_rows
from finegrain.data.prepared import CompletionData, PreferenceData
from finegrain.data.sampler import batch_indices, num_batches, shard_batch
from finegrain.data.schema import KINDS, check_columns, detect_kind, extract_prompt, validate_rows
from finegrain.data.tokenize import (
    IGNORE_INDEX,
    TokenLimits,
    spans_to_labels,
    tokenize_prompt,
    tokenize_response,
    tokenize_rows,
)

__all__ = [
    "IGNORE_INDEX",
    "KINDS",
    "CompletionData",
    "PreferenceData",
    "Rows",
    "TokenLimits",
    "batch_indices",
    "check_columns",
    "collate_completions",
    "collate_preferences",
    "detect_kind",
    "extract_prompt",
    "load_rows",
    "num_batches",
    "pad_token_id",
    "shard_batch",
    "spans_to_labels",
    "tokenize_prompt",
    "tokenize_response",
    "tokenize_rows",
    "validate_rows",
]
