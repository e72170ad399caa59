"""Errors that tell the user what to fix.

``DataError`` names the file (or data set), the row and the field; ``ConfigError`` names the option and says
what to change. Both derive from ``FinegrainError`` so the CLI can print them without a traceback.
"""

from __future__ import annotations


class FinegrainError(Exception):
    """Base class of errors the CLI reports as a one-paragraph message (no traceback)."""


class ConfigError(FinegrainError, ValueError):
    """An invalid or contradictory option. The message says which option and what to change."""


class DataError(FinegrainError, ValueError):
    """A bad input row.

    Messages count rows from 1, as a user sees them in the file: row 1 is the first data row (line 1 of a JSONL
    file, the first record of a JSON or Parquet file, the line after a CSV header), and row ``N`` of a batch is its
    ``N``-th response.

    Args:
        message: what is wrong, e.g. ``"empty response"``.
        source: file path or data-set name the row came from.
        row: 0-based row index within ``source`` (None when the problem is file-wide); shown as ``row + 1``.
        field: the column at fault (None when the problem is row-wide).

    Example:
        >>> str(DataError("empty response", source="pairs.jsonl", row=0, field="chosen"))
        "file pairs.jsonl, row 1, field 'chosen': empty response"
    """

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None, field: str | None = None):
        self.source, self.row, self.field, self.reason = source, row, field, message
        self.hint: str | None = None
        super().__init__(self._text())

    def _text(self) -> str:
        where = []
        if self.source is not None:
            where.append(f"file {self.source}")
        if self.row is not None:
            where.append(f"row {self.row + 1}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        text = f"{', '.join(where)}: {self.reason}" if where else self.reason
        return f"{text} ({self.hint})" if self.hint else text

    def add_hint(self, hint: str) -> DataError:
        """Append ``hint`` (what the user can do, e.g. the flag that skips such rows) to the message; returns self."""
        self.hint = hint
        self.args = (self._text(),)
        return self


SKIP_HINT = "pass --skip_invalid_rows to skip rows like this one; they are counted and logged"
"""The hint of a bad row that stopped a run which could have skipped it."""


class NonFiniteError(FinegrainError, FloatingPointError):
    """A reward source or loss produced NaN/inf where that cannot be skipped."""
