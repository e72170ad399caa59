"""Small files written atomically (a temporary sibling of this process, then a rename: a reader never sees half a
file) and JSON Lines read back."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from finegrain.errors import DataError

__all__ = ["read_jsonl", "write_jsonl", "write_text"]


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON Lines file (a bad line is a :class:`~finegrain.errors.DataError` naming file and row)."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise DataError(f"not a JSON line: {exc}", source=str(path), row=i) from None
    return rows


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_jsonl(path: str | Path, rows: Iterable[dict], *, ensure_ascii: bool = False) -> Path:
    """Write ``rows`` atomically (:func:`write_text`), one JSON line each."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=ensure_ascii) + "\n" for row in rows))
