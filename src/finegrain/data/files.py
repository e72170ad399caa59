"""Small files written atomically (a temporary sibling of this process, then a rename: a reader never sees half a
file) and JSON Lines read back."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from finegrain.data.loading import _read_json_lines

__all__ = ["read_jsonl", "write_jsonl", "write_text"]


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON Lines file, read as :func:`~finegrain.data.loading.load_rows` reads one (a bad line is a
    :class:`~finegrain.errors.DataError` naming file, row and line)."""
    return _read_json_lines(Path(path), Path(path).read_bytes())


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
