"""Data sets ready for training: load -> validate -> tokenize, then batches in a resumable, shardable order.

:class:`PreferenceData` holds tokenized pairs (preference rows, or revision rows with the revision as the chosen
response) and yields :class:`~finegrain.types.PreferenceBatch`; :class:`CompletionData` holds one-response rows
(SFT, token supervision, prompt-only) and yields :class:`~finegrain.types.CompletionBatch`. Both keep the source
order (skipped rows removed), so an example's ``index`` is stable for a given source and settings, and batch order
comes from the pure :func:`~finegrain.data.sampler.batch_indices`.

Typical use::

    data = PreferenceData.from_source("pairs.jsonl", tokenizer, limits=TokenLimits(max_length=512))
    for epoch in range(start_epoch, num_epochs):
        first = start_batch if epoch == start_epoch else 0
        for step, batch in enumerate(data.batches(8, seed=0, epoch=epoch, start_batch=first), start=first):
            ...  # after a checkpoint at (epoch, step), resume with start_epoch=epoch, start_batch=step + 1
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from finegrain.data.collate import collate_completions, collate_preferences, pad_token_id
from finegrain.data.loading import load_rows
from finegrain.data.sampler import batch_indices, check_divisible, shard_batch
from finegrain.data.schema import detect_kind, validate_rows
from finegrain.data.tokenize import TokenLimits, tokenize_rows
from finegrain.errors import DataError


class _Prepared(Sequence):
    kinds: ClassVar[tuple[str, ...]] = ()
    collate_examples: ClassVar[Callable]  # examples, pad id -> batch
    text_keys: ClassVar[tuple[str, ...]]  # the response texts of an example, in the batch's row order

    def __init__(
        self, examples: list[dict], *, pad_token_id: int, source: str = "<examples>", kind: str | None = None,
        skipped: Counter | None = None,
    ):
        self.examples = [{**ex, "index": i} for i, ex in enumerate(examples)]
        self.pad_token_id = pad_token_id
        self.source = source
        self.kind = kind
        self.skipped = Counter(skipped or {})

    @classmethod
    def from_source(
        cls,
        source: Any,
        tokenizer: Any,
        *,
        split: str | None = None,
        kind: str | None = None,
        limits: TokenLimits | None = None,
        skip_invalid: bool = False,
        max_examples: int | None = None,
        add_eos: bool = True,
    ):
        """Load, validate and tokenize a data set.

        Args:
            source: anything :func:`~finegrain.data.loading.load_rows` accepts (path, hub id, ``Dataset``, list).
            tokenizer: a Hugging Face fast tokenizer.
            split: the split to read (default ``"train"``).
            kind: the row kind; None detects it from the columns.
            limits: lengths and truncation policy (:class:`~finegrain.data.tokenize.TokenLimits`).
            skip_invalid: skip bad rows (counted per reason in ``.skipped`` and logged) instead of raising.
            max_examples: read only the first rows of the source.
            add_eos: append EOS to responses.

        Returns:
            The data set, ``len()`` = number of kept rows.

        Raises:
            DataError: a bad row (unless ``skip_invalid``), a missing column, a kind this class does not hold, or no
                row left.
        """
        rows = load_rows(source, split)
        if max_examples is not None:
            rows = rows.head(max_examples)
        kind = kind or detect_kind(rows.column_names, source=rows.source)
        if kind not in cls.kinds:
            raise DataError(
                f"{cls.__name__} takes rows of kind {' or '.join(cls.kinds)}, but these rows are of kind '{kind}'",
                source=rows.source,
            )
        skipped: Counter = Counter()
        valid = validate_rows(rows, kind, skip_invalid=skip_invalid, skipped=skipped)
        examples = tokenize_rows(
            valid, tokenizer, kind, limits, add_eos=add_eos, skip_invalid=skip_invalid, skipped=skipped,
            source=rows.source,
        )
        if not examples:
            raise DataError(f"no usable rows ({len(rows)} read, {sum(skipped.values())} skipped)", source=rows.source)
        if kind == "revision":
            examples = [_revision_as_pair(ex) for ex in examples]
        return cls(examples, pad_token_id=pad_token_id(tokenizer), source=rows.source, kind=kind, skipped=skipped)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def collate(self, indices: Sequence[int], pad_to_multiple_of: int | None = None):
        """The examples at ``indices`` as one batch (in that order), with their raw prompts
        (``batch.prompts``) and, unless the rows are prompts only, their response texts (``batch.responses``;
        pairs: chosen rows first) for reward sources that read text."""
        exs = [self.examples[i] for i in indices]
        batch = self.collate_examples(exs, self.pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
        batch.prompts = [ex["prompt"] for ex in exs] * len(self.text_keys)
        if self.kind != "prompt":
            batch.responses = [ex[key] for key in self.text_keys for ex in exs]
        return batch

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
        num_processes: int = 1,
        process_index: int = 0,
        pad_to_multiple_of: int | None = None,
    ) -> Iterator:
        """This process's batches of one epoch, from global batch ``start_batch`` on.

        Args:
            batch_size: the global batch size (over all processes); a multiple of ``num_processes``.
            seed: data seed; epoch: 0-based epoch (see :func:`~finegrain.data.sampler.batch_indices`).
            start_batch: the first global batch to yield (to resume after ``start_batch`` finished batches).
            drop_last: drop the final short batch.
            shuffle: permute (False: source order).
            num_processes: number of ranks; process_index: this rank (takes its contiguous slice of each batch).
            pad_to_multiple_of: passed to the collator.

        Returns:
            An iterator of batches; a rank whose slice of a final short batch is empty gets a batch of 0 rows.
        """
        check_divisible(batch_size, num_processes)
        for indices in batch_indices(len(self), batch_size, seed, epoch, drop_last, shuffle)[start_batch:]:
            yield self.collate(shard_batch(indices, num_processes, process_index), pad_to_multiple_of)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, kind={self.kind!r}, num_examples={len(self)})"


def _revision_as_pair(ex: dict) -> dict:
    """A tokenized revision row as a pair: the revision is the chosen response (an optional ``chosen`` is dropped)."""
    return {("chosen_" + k.removeprefix("revised_") if k.startswith("revised_") else k): v
            for k, v in ex.items() if not k.startswith("chosen_")}


class PreferenceData(_Prepared):
    """Tokenized preference pairs (see the module docstring); ``collate`` gives a
    :class:`~finegrain.types.PreferenceBatch`."""

    kinds = ("preference", "revision")
    collate_examples = staticmethod(collate_preferences)
    text_keys = ("chosen_text", "rejected_text")


class CompletionData(_Prepared):
    """Tokenized one-response rows (see the module docstring); ``collate`` gives a
    :class:`~finegrain.types.CompletionBatch`."""

    kinds = ("sft", "token", "prompt")
    collate_examples = staticmethod(collate_completions)
    text_keys = ("completion_text",)
