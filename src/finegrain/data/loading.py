"""Read rows from wherever they are: a hub id, local files, a ``datasets`` object or a list of dicts.

:func:`load_rows` returns :class:`Rows`, a read-only sequence of plain dicts that remembers, for every row, the
file it came from and its 0-based row index in that file, so that any later error can say exactly where the bad
row is. Local files are parsed here rather than through ``datasets.load_dataset``:

* JSON Lines are read line by line, so a malformed line is reported with its line number, and rows whose values
  have inconsistent types (a common data bug) reach the row validator in :mod:`finegrain.data.schema` instead of
  failing inside Arrow's type inference with a library traceback;
* parquet and CSV are read with ``pyarrow`` into an in-memory ``datasets.Dataset`` (nothing is written to the
  ``datasets`` cache).

Supported local formats: ``.jsonl`` / ``.json`` (a list of objects, a dict of equal-length columns, a dict with one
list of objects such as ``{"data": [...]}``, or JSON Lines under a ``.json`` name), ``.parquet``, ``.csv``, each
optionally gzip-compressed (``.jsonl.gz``); a directory of such files (split by file name the way the Hub does:
``train.jsonl``, ``test-00000-of-00001.parquet``, ``validation/part-0.jsonl``); and a directory written by
``Dataset.save_to_disk``. Anything else that is not a local path is passed to ``datasets.load_dataset`` as a hub id.
Every failure becomes a :class:`~finegrain.errors.DataError` naming the file (and the row when known).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from finegrain.errors import DataError

SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet", ".csv")
"""File types :func:`load_rows` reads (each also with a ``.gz`` suffix)."""

# Suffixes that mark a source string as a file path (rather than a hub id) even when the file does not exist.
_FILE_LIKE = {*SUFFIXES, ".gz", ".txt", ".tsv", ".arrow", ".xlsx", ".zip", ".xz", ".bz2", ".pkl", ".yaml", ".yml"}

_SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SPLIT_NAME = re.compile(r"^([a-z]+)(?:[-_.].*)?$")


class Rows(Sequence):
    """Rows of one split as plain dicts, with the origin of each row.

    A source made of several files keeps one part per file (no Arrow concatenation, so files whose columns or
    types differ are still read, and each bad row is reported by the row validator with its own file and row).

    Args:
        parts: ``(name, data)`` per part, in order; ``data`` is a ``datasets.Dataset`` or a list of dicts and
            ``name`` the file (or data-set name) its rows are reported under.
        source: the name of the whole source (a path, a directory, a hub id, ``"<list>"``...).
    """

    def __init__(self, parts: Sequence[tuple[str, Any]], source: str):
        self.parts = [(name, data) for name, data in parts]
        self.source = source

    @property
    def column_names(self) -> list[str]:
        """Column names; for rows of mixed keys, the union in order of first appearance."""
        seen: dict[str, None] = {}
        for _, data in self.parts:
            names = getattr(data, "column_names", None)
            if names is not None:
                seen.update(dict.fromkeys(names))
            else:
                for row in data:
                    seen.update(dict.fromkeys(row))
        return list(seen)

    def __len__(self) -> int:
        return sum(len(data) for _, data in self.parts)

    def _find(self, i: int) -> tuple[str, Any, int]:
        if i < 0:
            i += len(self)
        if i >= 0:
            for name, data in self.parts:
                if i < len(data):
                    return name, data, i
                i -= len(data)
        raise IndexError("row index out of range")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        _, data, j = self._find(i)
        return dict(data[j])

    def __iter__(self) -> Iterator[dict]:
        for _, data in self.parts:
            for row in data:
                yield dict(row)

    def locate(self, i: int) -> tuple[str, int]:
        """``(file, row within that file)`` of row ``i``, for error messages."""
        name, _, j = self._find(i)
        return name, j

    def head(self, n: int) -> Rows:
        """The first ``n`` rows (all of them when ``n`` is larger), keeping their origins."""
        parts, left = [], n
        for name, data in self.parts:
            if left <= 0:
                break
            if left < len(data):
                data = data.select(range(left)) if hasattr(data, "select") else data[:left]
            parts.append((name, data))
            left -= len(data)
        return Rows(parts, self.source)

    def map(self, fn: Callable[[dict, tuple[str, int]], dict]) -> Rows:
        """The rows ``fn(row, (file, j))`` (a copy of each row and its origin, as :meth:`locate` gives it), in the
        same parts."""
        return Rows([(name, [fn(dict(r), (name, j)) for j, r in enumerate(data)]) for name, data in self.parts],
                    self.source)

    def __repr__(self) -> str:
        return f"Rows(source={self.source!r}, num_rows={len(self)}, columns={self.column_names})"


def _single(data: Any, name: str) -> Rows:
    return Rows([(name, data)], name)


def load_rows(
    source: Any,
    split: str | None = None,
    *,
    name: str | None = None,
    revision: str | None = None,
    source_name: str | None = None,
) -> Rows:
    """Load one split of a data set as :class:`Rows`.

    Args:
        source: a local file or directory (see the module docstring), a hub id (``"org/name"``), a
            ``datasets.Dataset`` / ``DatasetDict``, or a list of dicts.
        split: the split to read. None means ``"train"`` where splits exist; a directory without split names is
            all ``"train"``; a single file is read whole whatever the split (it is the data set itself).
        name: the hub configuration name (``datasets.load_dataset(source, name)``); hub ids only.
        revision: the hub revision (branch, tag or commit); hub ids only.
        source_name: the name used in error messages for in-memory sources (default ``"<list>"`` or the
            data set's own name).

    Returns:
        :class:`Rows` with ``.source`` set to the name used in messages.

    Raises:
        DataError: a missing file, an unknown extension, an unreadable or malformed file (with the line when
            known), a missing split, or a hub data set that cannot be loaded.

    Example:
        >>> rows = load_rows([{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}])
        >>> rows.source, len(rows), rows[0]["chosen"]
        ('<list>', 1, ' 4')
    """
    if isinstance(source, Rows):
        return source
    if isinstance(source, (list, tuple)):
        return _from_list(source, source_name or "<list>")
    if isinstance(source, Path) or isinstance(source, str):
        path = Path(source).expanduser()
        if path.exists() or _looks_like_path(str(source)):
            return _from_path(path, split)
        return _from_hub(str(source), split, name, revision)
    import datasets

    if isinstance(source, datasets.DatasetDict):
        label = source_name or "<DatasetDict>"
        return _single(_pick_split(source, split, label), label)
    if isinstance(source, datasets.Dataset):
        return _single(source, source_name or _dataset_label(source))
    raise TypeError(
        f"load_rows: unsupported source of type {type(source).__name__}; give a path, a hub id, a "
        "datasets.Dataset/DatasetDict or a list of dicts"
    )


def _dataset_label(ds: Any) -> str:
    info = getattr(ds, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    return f"<Dataset {name}>" if name else "<Dataset>"


def _looks_like_path(source: str) -> bool:
    """A string names a file (not a hub id) if it is path-shaped or has a file suffix."""
    if source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source or source.count("/") > 1:
        return True
    return Path(source).suffix.lower() in _FILE_LIKE


def _from_list(items: Sequence[Any], label: str) -> Rows:
    for i, row in enumerate(items):
        if not isinstance(row, Mapping):
            raise DataError(f"expected a dict per row, got {type(row).__name__}", source=label, row=i)
    return _single([dict(r) for r in items], label)


def _pick_split(dd: Mapping[str, Any], split: str | None, label: str) -> Any:
    names = list(dd)
    if split is None:
        if len(names) == 1:
            return dd[names[0]]
        split = "train"
    if split in dd:
        return dd[split]
    raise DataError(f"no split '{split}'; available splits: {', '.join(names) or 'none'}", source=label)


# ---------------------------------------------------------------------------------------------------- local files


def _file_type(path: Path) -> str | None:
    """``".jsonl"`` etc. for a supported file (looking through ``.gz``), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in SUFFIXES else None


def _from_path(path: Path, split: str | None) -> Rows:
    if not path.exists():
        raise DataError("file not found", source=str(path))
    if path.is_dir():
        return _from_directory(path, split)
    kind = _file_type(path)
    if kind is None:
        raise DataError(
            f"unknown file type '{''.join(path.suffixes) or '(none)'}'; use one of "
            f"{', '.join(SUFFIXES)} (optionally .gz)",
            source=str(path),
        )
    # A single file is the whole data set: a split option (e.g. the default --eval_split test) does not apply to it.
    return _read_file(path, kind)


def _split_of(path: Path, root: Path) -> str | None:
    """The split a file belongs to by the Hub's naming rules, looking at the file name then its folders."""
    rel = path.relative_to(root)
    candidates = [path.name.split(".")[0].lower()] + [p.lower() for p in reversed(rel.parts[:-1])]
    for word in candidates:
        m = _SPLIT_NAME.match(word)
        if m is None:
            continue
        for split, aliases in _SPLIT_ALIASES.items():
            if m.group(1) in aliases:
                return split
    return None


def _from_directory(root: Path, split: str | None) -> Rows:
    if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
        return _from_saved(root, split)
    files = sorted(p for p in root.rglob("*") if p.is_file() and _file_type(p) and not _hidden(p, root))
    if not files:
        raise DataError(f"no data files ({', '.join(SUFFIXES)}) in this directory", source=str(root))
    by_split: dict[str | None, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f, root), []).append(f)
    wanted = split or "train"
    canonical = next((s for s, aliases in _SPLIT_ALIASES.items() if wanted in aliases), wanted)
    if canonical in by_split:
        chosen = by_split[canonical]
    elif set(by_split) == {None} and wanted == "train":
        chosen = files
    else:
        found = sorted(s for s in by_split if s is not None)
        raise DataError(
            f"no files for split '{wanted}'; splits found by file name: {', '.join(found) or 'none'}", source=str(root)
        )
    parts = [_read_file(f, _file_type(f)) for f in chosen]
    return Rows([p for r in parts for p in r.parts], str(root))


def _hidden(path: Path, root: Path) -> bool:
    return any(p.startswith((".", "_")) for p in path.relative_to(root).parts)


def _from_saved(root: Path, split: str | None) -> Rows:
    import datasets

    try:
        obj = datasets.load_from_disk(str(root))
    except Exception as e:
        raise DataError(f"cannot read a saved data set: {e}", source=str(root)) from e
    if isinstance(obj, datasets.DatasetDict):
        obj = _pick_split(obj, split, str(root))
    return _single(obj, str(root))


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix.lower() == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read file: {e}", source=str(path)) from e


def _read_file(path: Path, kind: str) -> Rows:
    if kind == ".jsonl":
        return _single(_read_json_lines(path, _read_bytes(path)), str(path))
    if kind == ".json":
        return _single(_read_json(path, _read_bytes(path)), str(path))
    return _single(_read_arrow(path, kind), str(path))


def _read_json_lines(path: Path, raw: bytes) -> list[dict]:
    rows: list[dict] = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        line = line.strip()
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            line = line[3:]
        if not line:
            continue
        row = len(rows)
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"line {lineno} is not valid UTF-8 ({e.reason})", source=str(path), row=row) from e
        except json.JSONDecodeError as e:
            raise DataError(
                f"line {lineno} is not valid JSON ({e.msg} at column {e.colno})", source=str(path), row=row
            ) from e
        if not isinstance(obj, dict):
            raise DataError(
                f"line {lineno} is a JSON {type(obj).__name__}, expected an object with one key per column",
                source=str(path),
                row=row,
            )
        rows.append(obj)
    return rows


def _read_json(path: Path, raw: bytes) -> list[dict]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"file is not valid UTF-8 ({e.reason} at byte {e.start})", source=str(path)) from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name, as datasets' json loader accepts
            return _read_json_lines(path, raw)
        raise DataError(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", source=str(path)) from e
    if isinstance(obj, dict):
        values = list(obj.values())
        if len(values) == 1 and isinstance(values[0], list) and all(isinstance(r, dict) for r in values[0]):
            obj = values[0]  # {"data": [{...}, ...]}
        elif values and all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
            obj = [dict(zip(obj, row)) for row in zip(*values)]  # columns {"prompt": [...], "chosen": [...]}
        else:
            raise DataError(
                'a JSON object at the top level must hold columns of equal length ({"prompt": [...], ...}) or one '
                'list of row objects ({"data": [...]}); for one object per row use a list or JSON Lines',
                source=str(path),
            )
    if not isinstance(obj, list):
        raise DataError(f"expected a list of row objects, got a JSON {type(obj).__name__}", source=str(path))
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object per row, got {type(row).__name__}", source=str(path), row=i)
    return obj


def _read_arrow(path: Path, kind: str) -> Any:
    import datasets
    import pyarrow as pa

    try:
        buf = pa.BufferReader(_read_bytes(path)) if path.suffix.lower() == ".gz" else str(path)
        if kind == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(buf)
        else:
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(buf)
        return datasets.Dataset(table)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for truncated or malformed files
        what = "parquet" if kind == ".parquet" else "CSV"
        raise DataError(f"cannot read {what} file ({type(e).__name__}: {e})", source=str(path)) from e


# ------------------------------------------------------------------------------------------------------------ hub


def _from_hub(repo_id: str, split: str | None, name: str | None, revision: str | None) -> Rows:
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, name, split=split or "train", revision=revision)
    except Exception as e:  # network, authentication, missing repo or split: all one message for the user
        raise DataError(
            f"cannot load '{repo_id}' from the Hugging Face Hub ({type(e).__name__}: {e}); a local file must exist "
            "and end in one of " + ", ".join(SUFFIXES),
            source=repo_id,
        ) from e
    return _single(ds, repo_id)
