"""load_rows: every source kind, and every unreadable input ends in a DataError naming the file (and row)."""

import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finegrain.data.loading import Rows, load_rows
from finegrain.data.schema import validate_rows
from finegrain.errors import DataError

PAIRS = [
    {"prompt": "what color is the sky ?", "chosen": "blue", "rejected": "red"},
    {"prompt": "the cat sat on", "chosen": "the mat", "rejected": "the dog"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_list_of_dicts():
    rows = load_rows(PAIRS)
    assert isinstance(rows, Rows) and rows.source == "<list>" and len(rows) == 2
    assert rows[1] == PAIRS[1] and rows.column_names == ["prompt", "chosen", "rejected"]
    assert rows.locate(1) == ("<list>", 1)
    assert load_rows(rows) is rows


def test_list_with_a_non_dict_row():
    with pytest.raises(DataError) as e:
        load_rows([PAIRS[0], ["not", "a", "dict"]])
    assert e.value.row == 1 and e.value.source == "<list>"


def test_columns_are_the_union_of_keys_in_first_seen_order():
    assert load_rows([{"a": 1}, {"b": 2, "a": 3}]).column_names == ["a", "b"]


def test_jsonl_blank_lines_bom_and_crlf(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(PAIRS[0]).encode() + b"\r\n\n  \n" + json.dumps(PAIRS[1]).encode())
    rows = load_rows(p)
    assert rows.source == str(p) and list(rows) == PAIRS


def test_jsonl_malformed_line_names_file_row_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(PAIRS[0]) + "\n\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError) as e:
        load_rows(str(p))
    assert e.value.source == str(p) and e.value.row == 1 and "line 3" in str(e.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('[1, 2]\n')
    with pytest.raises(DataError, match="expected an object") as e:
        load_rows(p)
    assert e.value.row == 0


def test_jsonl_invalid_utf8(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(json.dumps(PAIRS[0]).encode() + b'\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match="UTF-8") as e:
        load_rows(p)
    assert e.value.row == 1


def test_gzipped_jsonl(tmp_path):
    p = tmp_path / "pairs.jsonl.gz"
    p.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in PAIRS).encode()))
    assert list(load_rows(p)) == PAIRS
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read"):
        load_rows(tmp_path / "broken.jsonl.gz")


@pytest.mark.parametrize(
    "content",
    [
        PAIRS,  # a list of objects
        {"data": PAIRS},  # one list of objects under a key
        {k: [r[k] for r in PAIRS] for k in PAIRS[0]},  # columns
    ],
)
def test_json_layouts(tmp_path, content):
    p = tmp_path / "pairs.json"
    p.write_text(json.dumps(content))
    assert list(load_rows(p)) == PAIRS


def test_json_lines_under_a_json_name(tmp_path):
    p = write_jsonl(tmp_path / "pairs.json", PAIRS)
    assert list(load_rows(p)) == PAIRS


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"prompt": "x", "chosen": ["a"], "rejected": ["b", "c"]}', "columns of equal length"),
        ('"just a string"', "expected a list"),
        ('[{"a": 1}, 3]', "expected a JSON object per row"),
        ('[{"a": 1}', "not valid JSON"),
    ],
)
def test_json_bad_layouts(tmp_path, text, match):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(DataError, match=match) as e:
        load_rows(p)
    assert e.value.source == str(p)


def test_parquet_and_truncated_parquet(tmp_path):
    p = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(PAIRS), p)
    rows = load_rows(p)
    assert list(rows) == PAIRS and rows.locate(1) == (str(p), 1)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot read parquet") as e:
        load_rows(cut)
    assert e.value.source == str(cut)


def test_csv_and_malformed_csv(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text("prompt,chosen,rejected,margin\nhi,a,b,0.5\nyo,c,d,1\n")
    rows = load_rows(p)
    assert rows[0] == {"prompt": "hi", "chosen": "a", "rejected": "b", "margin": 0.5}
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,chosen,rejected\nhi,a,b\nyo,c,d,e,f\n")
    with pytest.raises(DataError, match="cannot read CSV") as e:
        load_rows(bad)
    assert e.value.source == str(bad)


def test_missing_file_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub called"))
    for source in [tmp_path / "missing.jsonl", "data/missing.jsonl", "./missing", "missing.csv"]:
        with pytest.raises(DataError, match="file not found") as e:
            load_rows(source)
        assert str(source).lstrip("./") in e.value.source


def test_unknown_extension(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("hello")
    with pytest.raises(DataError, match="unknown file type '.txt'") as e:
        load_rows(p)
    assert e.value.source == str(p)


def test_a_single_file_is_the_whole_data_set_whatever_the_split(tmp_path):
    """A single file has no splits: --eval_split test (the default) on an eval file reads the file, not an error
    after the models were loaded."""
    p = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert len(load_rows(p, split="train")) == 2
    assert len(load_rows(p, split="test")) == 2 and len(load_rows(p)) == 2


def test_directory_splits_by_file_name(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    write_jsonl(tmp_path / "test.jsonl", PAIRS[:1])
    (tmp_path / "README.md").write_text("not data")
    assert len(load_rows(tmp_path)) == 2
    assert len(load_rows(tmp_path, split="test")) == 1
    with pytest.raises(DataError, match="no files for split 'validation'; splits found by file name: test, train"):
        load_rows(tmp_path, split="validation")


def test_directory_of_shards_names_the_file_of_a_bad_row(tmp_path):
    """Rows of a multi-file source are numbered within their own file in errors."""
    sub = tmp_path / "data"
    sub.mkdir()
    write_jsonl(sub / "train-00000-of-00002.jsonl", PAIRS)
    pq.write_table(pa.Table.from_pylist(PAIRS), sub / "train-00001-of-00002.parquet")
    write_jsonl(sub / "validation-00000-of-00001.jsonl", [dict(PAIRS[0], chosen=None)])
    rows = load_rows(tmp_path, split="train")
    assert len(rows) == 4 and rows.locate(3) == (str(sub / "train-00001-of-00002.parquet"), 1)
    mapped = rows.map(lambda r, origin: {**r, "origin": origin})  # same parts, each row told its origin
    assert [p for p, _ in mapped.parts] == [p for p, _ in rows.parts] and mapped.source == rows.source
    assert [r["origin"] for r in mapped] == [rows.locate(i) for i in range(4)] and mapped[0]["chosen"] == rows[0]["chosen"]
    with pytest.raises(DataError) as e:
        validate_rows(load_rows(tmp_path, split="validation"))
    assert (e.value.source, e.value.row, e.value.field) == (str(sub / "validation-00000-of-00001.jsonl"), 0, "chosen")


def test_directory_without_split_names_is_train(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", PAIRS)
    write_jsonl(tmp_path / "b.jsonl", PAIRS)
    rows = load_rows(tmp_path)
    assert len(rows) == 4 and rows.locate(2) == (str(tmp_path / "b.jsonl"), 0)


def test_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no data files"):
        load_rows(tmp_path)


def test_directory_with_mismatched_files(tmp_path):
    """Files with other columns or types are read side by side; the row at fault is named by the validator."""
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]), tmp_path / "b.parquet")
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "chosen": 3, "rejected": "r"}])
    rows = load_rows(tmp_path)
    assert len(rows) == 4 and set(rows.column_names) == {"prompt", "chosen", "rejected", "text"}
    rows_b = validate_rows(rows, "preference", skip_invalid=True)
    assert [(r["source"], r["row"]) for r in rows_b] == [(str(tmp_path / "a.parquet"), 0), (str(tmp_path / "a.parquet"), 1)]
    with pytest.raises(DataError) as e:
        validate_rows(rows, "preference")
    assert (e.value.source, e.value.row, e.value.field, e.value.reason) == (
        str(tmp_path / "b.parquet"), 0, "chosen", "missing value")


def test_datasets_objects_and_save_to_disk(tmp_path):
    ds = datasets.Dataset.from_list(PAIRS)
    assert list(load_rows(ds)) == PAIRS
    dd = datasets.DatasetDict(train=ds, test=ds.select([0]))
    assert len(load_rows(dd)) == 2 and len(load_rows(dd, split="test")) == 1
    with pytest.raises(DataError, match="no split 'dev'; available splits: train, test"):
        load_rows(dd, split="dev")
    dd.save_to_disk(str(tmp_path / "saved"))
    assert len(load_rows(tmp_path / "saved", split="test")) == 1


def test_hub_errors_are_wrapped(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="cannot load 'org/pairs' from the Hugging Face Hub") as e:
        load_rows("org/pairs")
    assert e.value.source == "org/pairs"


def test_hub_id_passes_split_and_config(monkeypatch):
    seen = {}

    def fake(repo, name, split, revision):
        seen.update(repo=repo, name=name, split=split, revision=revision)
        return datasets.Dataset.from_list(PAIRS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = load_rows("org/pairs", "test", name="cfg", revision="main")
    assert rows.source == "org/pairs" and len(rows) == 2
    assert seen == {"repo": "org/pairs", "name": "cfg", "split": "test", "revision": "main"}


def test_head_keeps_origins(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", PAIRS)
    write_jsonl(tmp_path / "b.jsonl", PAIRS)
    rows = load_rows(tmp_path).head(3)
    assert len(rows) == 3 and rows.locate(2) == (str(tmp_path / "b.jsonl"), 0)
    assert len(load_rows(datasets.Dataset.from_list(PAIRS)).head(1)) == 1


def test_unsupported_source_type():
    with pytest.raises(TypeError, match="unsupported source"):
        load_rows(42)
