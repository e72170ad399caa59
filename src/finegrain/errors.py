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

    Args:
        message: what is wrong, e.g. ``"empty response"``.
        source: file path or data-set name the row came from.
        row: 0-based row index within ``source`` (None when the problem is file-wide).
        field: the column at fault (None when the problem is row-wide).
    """

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None, field: str | None = None):
        self.source, self.row, self.field, self.reason = source, row, field, message
        where = []
        if source is not None:
            where.append(f"file {source}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class NonFiniteError(FinegrainError, FloatingPointError):
    """A reward source or loss produced NaN/inf where that cannot be skipped."""
