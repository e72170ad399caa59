"""finegrain label edits: labels by hand on small revisions, the spans format read by another tokenizer, the data
layer loading the output, the world default, errors."""

import doctest
import json
import sys
from pathlib import Path

import pytest

import finegrain.labeling.edits as edits
from finegrain.cli.commands import command_config
from finegrain.cli.commands import label as label_main
from finegrain.config import build
from finegrain.data.prepared import CompletionData
from finegrain.data.schema import validate_rows
from finegrain.data.tokenize import IGNORE_INDEX
from finegrain.errors import ConfigError, DataError
from finegrain.labeling.edits import EditsConfig, label_rows, run_edits, spans_from_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from _tiny_tokenizers import bpe_tokenizer, word_tokenizer  # noqa: E402

REVISIONS = [
    {"prompt": "what color is the sky ?", "rejected": "the sky is red .", "revised": "the sky is blue ."},
    {"prompt": "the cat", "rejected": "sat on the mat . the dog", "revised": "sat on the mat ."},
    {"prompt": "the cat", "rejected": "sat on a mat .", "revised": "sat on a mat ."},  # no edit: left out
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def valid(rows):
    # the data layer rejects revised == rejected, so the no-edit pair is checked through label_rows directly
    return [{**r, "row": i, "chosen": None, "conversational": False} for i, r in enumerate(rows)]


def test_doctests():
    assert doctest.testmod(edits, raise_on_error=False).failed == 0


def test_labels_by_hand():
    out = label_rows(valid(REVISIONS), word_tokenizer())
    assert [(r["side"], r["pair"]) for r in out] == [("rejected", 0), ("revised", 0), ("rejected", 1), ("revised", 1)]
    # "the sky is red ." -> "the sky is blue .": red substituted
    assert out[0]["labels"] == [0, 0, 0, -1, 0] and out[1]["labels"] == [0, 0, 0, 1, 0]
    # "sat on the mat . the dog" -> "sat on the mat .": "the dog" deleted; the revision has nothing added
    assert out[2]["labels"] == [0, 0, 0, 0, 0, -1, -1] and out[3]["labels"] == [0, 0, 0, 0, 0]
    kept = label_rows(valid(REVISIONS), word_tokenizer(), keep_identical=True, sides="revised")
    assert len(kept) == 3 and kept[2]["labels"] == [0] * 5 and {r["side"] for r in kept} == {"revised"}


def test_spans_from_labels_by_hand():
    assert spans_from_labels([0, -1, -1, 0, 0], [(0, 2), (3, 5), (6, 9), (10, 11), (11, 11)]) == [
        {"start": 0, "end": 2, "label": 0}, {"start": 3, "end": 9, "label": -1}, {"start": 10, "end": 11, "label": 0}]


def test_output_loads_as_token_rows_and_spans_work_for_another_tokenizer(tmp_path):
    src = write_jsonl(tmp_path / "revisions.jsonl", REVISIONS[:2])
    word = word_tokenizer()
    out = tmp_path / "edits.jsonl"
    word.save_pretrained(tmp_path / "tok")
    summary = run_edits(build(EditsConfig, {"dataset_name": str(src), "tokenizer_name_or_path": str(tmp_path / "tok"),
                                            "output_file": str(out)}))
    assert summary.pairs == 2 and summary.written_rows == 4
    assert (summary.negative_tokens, summary.positive_tokens) == (3, 1)
    data = CompletionData.from_source(str(out), word)
    assert data.kind == "token" and len(data) == 4
    assert data[0]["token_labels"] == [0, 0, 0, -1, 0, IGNORE_INDEX]  # EOS carries no label
    # spans: character level, read by a byte-level BPE tokenizer that cuts words differently
    spans_out = tmp_path / "spans.jsonl"
    run_edits(build(EditsConfig, {"dataset_name": str(src), "tokenizer_name_or_path": str(tmp_path / "tok"),
                                  "output_file": str(spans_out), "format": "spans"}))
    row = json.loads(spans_out.read_text().splitlines()[0])
    assert [s for s in row["spans"] if s["label"] != 0] == [{"start": 11, "end": 14, "label": -1}]  # "red"
    bpe = bpe_tokenizer()
    data = CompletionData.from_source(str(spans_out), bpe)
    offs, labels = data[0]["completion_offsets"], data[0]["token_labels"]
    assert -1 in labels
    for (s, e), lab in zip(offs, labels):
        if e > s and s >= 11 and e <= 14:
            assert lab == -1
        elif e > s and (e <= 11 or s >= 14):
            assert lab in (0, IGNORE_INDEX)


def test_command_line_on_the_world(tiny_world, tmp_path):
    out = tmp_path / "world_edits.jsonl"
    assert label_main(["edits", "--world_dir", str(tiny_world), "--output_file", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    n_revisions = sum(1 for line in (tiny_world / "data" / "revisions.jsonl").read_text().splitlines() if line)
    assert 0 < len(rows) <= 2 * n_revisions and len(rows) % 2 == 0
    assert all(len(r["labels"]) == len(r["response"].split()) for r in rows)  # world tokens are words
    assert any(-1 in r["labels"] for r in rows) and any(1 in r["labels"] for r in rows)
    with pytest.raises(ConfigError, match="overwrite_output"):
        run_edits(command_config("label edits", EditsConfig, ["--world_dir", str(tiny_world), "--output_file", str(out)]))


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        build(EditsConfig, {"dataset_name": "x.jsonl", "output_file": "y.jsonl"})
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "rejected": "a", "revised": ""}])
    word_tokenizer().save_pretrained(tmp_path / "tok")
    cfg = {"dataset_name": str(bad), "tokenizer_name_or_path": str(tmp_path / "tok"),
           "output_file": str(tmp_path / "o.jsonl")}
    with pytest.raises(DataError, match="row 1.*revised"):
        run_edits(build(EditsConfig, cfg))
    assert not (tmp_path / "o.jsonl").exists()
    summary = run_edits(build(EditsConfig, {**cfg, "skip_invalid_rows": True}))
    assert summary.skipped == 1 and summary.written_rows == 0
    assert validate_rows([{"prompt": "p", "response": "x", "labels": [1]}], "token")  # the output kind exists
