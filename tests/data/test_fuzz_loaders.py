"""Fuzzing the whole data path (load -> validate -> tokenize -> collate) with hostile rows and files.

Whatever the input (random unicode, missing fields, wrong types, empty or very long strings, NaN/inf, chosen ==
rejected, prompt-only rows given as pairs, revisions identical to the original, label lists of the wrong length,
malformed JSON lines, truncated parquet), the outcome is one of:

* a data set whose batches are well formed;
* a :class:`DataError` naming the source and the row or the field (strict mode), or, with ``skip_invalid=True``,
  counted skips (kept + skipped = rows read) and a DataError only for problems of the whole file;

never any other exception.
"""

import json
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from finegrain.data.prepared import CompletionData, PreferenceData
from finegrain.data.tokenize import TokenLimits
from finegrain.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_tokenizers import CHATML, bpe_tokenizer, word_tokenizer  # noqa: E402

TOKENIZERS = [word_tokenizer(), word_tokenizer(bos=False), bpe_tokenizer(), bpe_tokenizer(CHATML)]
LIMITS = TokenLimits(max_length=48, max_prompt_length=24)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

good_texts = st.one_of(
    st.sampled_from(["the sky is blue", "the cat sat on the mat .", "red", "what color is the sky ?", "a " * 2000]),
    st.text(min_size=1, max_size=30).filter(str.strip),  # random unicode
)
junk = st.one_of(
    st.none(),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.integers(-2, 2), max_size=3),
    st.dictionaries(st.sampled_from(["role", "content", "x"]), st.integers(), max_size=2),
    st.sampled_from(["", " ", "\n\t ", "bad \ud800 text"]),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.one_of(good_texts, st.none())}),
             max_size=3),
)
numbers = st.one_of(st.floats(-5, 5), st.floats(-5, 5), st.floats(-5, 5),
                    st.sampled_from([float("nan"), float("inf"), -float("inf")]))


def said(role, text):
    return [{"role": role, "content": text}]


@st.composite
def mutated(draw, row, fields):
    """``row`` with up to two fields dropped or replaced by junk (wrong types, empty strings, NaN, bad unicode...)."""
    row = dict(row)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        field = draw(st.sampled_from(fields))
        if draw(st.booleans()):
            row.pop(field, None)
        else:
            row[field] = draw(junk)
    return row


@st.composite
def preference_rows(draw, conversational, implicit, extras):
    prompt, chosen, rejected = draw(good_texts), draw(good_texts), draw(good_texts)
    if draw(st.sampled_from(range(8))) == 0:
        rejected = chosen  # chosen identical to rejected
    if conversational:
        prompt, chosen, rejected = said("user", prompt), said("assistant", chosen), said("assistant", rejected)
    row = {"chosen": prompt + chosen, "rejected": prompt + rejected} if implicit else \
        {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if implicit and not conversational:
        row = {"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"}
    for name in extras:
        value = draw(st.lists(numbers, max_size=6)) if name.endswith("token_rewards") else draw(numbers)
        row[name] = value if name != "subset" else draw(good_texts)
    return draw(mutated(row, list(row)))


@st.composite
def preference_data(draw):
    conversational, implicit = draw(st.booleans()), draw(st.booleans())
    groups = draw(st.lists(st.sampled_from([
        ("margin",), ("subset",), ("chosen_token_rewards", "rejected_token_rewards"),
        ("ref_chosen_logps", "ref_rejected_logps"), ("ref_chosen_logps",),  # the last: one of a pair only
    ]), unique=True, max_size=2))
    extras = sorted({name for group in groups for name in group})
    return draw(st.lists(preference_rows(conversational, implicit, extras), min_size=1, max_size=4))


def check(source, n_rows, data_cls, skip, tokenizer, kind=None):
    """Run the whole path; return the DataError (checked to name its source and row/field) or None."""
    try:
        data = data_cls.from_source(source, tokenizer, kind=kind, limits=LIMITS, skip_invalid=skip)
    except DataError as e:
        event(f"DataError: {getattr(e, 'code', e.reason)[:40]} ({e.field})")
        assert e.source is not None
        if skip:  # only problems of the whole file survive skip_invalid
            assert e.row is None or "line" in e.reason, e
        elif isinstance(source, list):  # rows in memory: the error is about a row, a column or the kind of rows
            assert e.row is not None or e.field is not None or "kind" in e.reason, e
        return e
    event("data set built" + (" after skips" if data.skipped else ""))
    for reason in data.skipped:
        event(f"skipped: {reason}")
    assert len(data) + sum(data.skipped.values()) == n_rows and (skip or not data.skipped)
    batch = data.collate(list(range(len(data))))
    lengths = batch.completion_mask.sum(1) + batch.prompt_attention_mask.sum(1)
    assert (lengths <= LIMITS.max_length).all() and (batch.prompt_attention_mask.sum(1) >= 1).all()
    return None


@FUZZ
@given(rows=preference_data(), skip=st.booleans(), t=st.integers(0, 3), kind=st.sampled_from([None, "preference"]))
def test_preference_rows_in_memory(rows, skip, t, kind):
    check(rows, len(rows), PreferenceData, skip, TOKENIZERS[t], kind)


@FUZZ
@given(rows=preference_data(), garbage=st.lists(st.text(max_size=12), max_size=2),
       at=st.integers(0, 4), skip=st.booleans())
def test_preference_rows_from_jsonl_with_malformed_lines(rows, garbage, at, skip):
    lines = [json.dumps(r) for r in rows]
    lines[at:at] = garbage
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pairs.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        err = check(path, len(rows), PreferenceData, skip, TOKENIZERS[0])
    bad_line = any(g.strip() and not _is_json_object(g) for g in garbage)
    if bad_line:
        assert err is not None and err.source == str(path) and err.row is not None and "line" in err.reason
    elif err is not None:
        assert err.source == str(path)


def _is_json_object(line):
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


@FUZZ
@given(n=st.integers(1, 4), cut=st.floats(0.0, 0.99))
def test_truncated_parquet(n, cut):
    rows = [{"prompt": "the sky", "chosen": "is blue", "rejected": "is red"}] * n
    with tempfile.TemporaryDirectory() as d:
        good, bad = Path(d) / "good.parquet", Path(d) / "bad.parquet"
        pq.write_table(pa.Table.from_pylist(rows), good)
        raw = good.read_bytes()
        bad.write_bytes(raw[: int(len(raw) * cut)])
        assert check(good, n, PreferenceData, False, TOKENIZERS[0]) is None
        err = check(bad, n, PreferenceData, False, TOKENIZERS[0])
        assert err is not None and err.source == str(bad) and "parquet" in err.reason


@FUZZ
@given(prompts=st.lists(st.one_of(good_texts, junk), min_size=1, max_size=4), skip=st.booleans())
def test_prompt_only_rows_given_as_pairs(prompts, skip):
    err = check([{"prompt": p} for p in prompts], len(prompts), PreferenceData, skip, TOKENIZERS[0], "preference")
    assert err is not None and err.field == "chosen" and err.row is None


@st.composite
def revision_rows(draw):
    rejected = draw(good_texts)
    revised = rejected if draw(st.sampled_from(range(4))) == 0 else draw(good_texts)  # identical to the original
    row = {"prompt": draw(good_texts), "rejected": rejected, "revised": revised}
    if draw(st.booleans()):
        row["chosen"] = draw(st.one_of(good_texts, junk))
    return draw(mutated(row, list(row)))


@FUZZ
@given(rows=st.lists(revision_rows(), min_size=1, max_size=4), skip=st.booleans(), t=st.integers(0, 3))
def test_revision_rows(rows, skip, t):
    err = check(rows, len(rows), PreferenceData, skip, TOKENIZERS[t])
    same = [i for i, r in enumerate(rows) if "revised" in r and r["revised"] == r.get("rejected")]
    if same and not skip:
        assert err is not None and (err.row is None or err.row <= same[0])


@FUZZ
@given(data=st.data(), n=st.integers(1, 4), skip=st.booleans(), t=st.integers(0, 3))
def test_token_rows(data, n, skip, t):
    """Labels of the right length (with or without EOS) or off by a few; spans in and out of range."""
    tokenizer, rows = TOKENIZERS[t], []
    for _ in range(n):
        response = data.draw(good_texts)
        row = {"prompt": data.draw(good_texts), "response": response}
        if data.draw(st.booleans()):
            size = len(tokenizer(response, add_special_tokens=False)["input_ids"]) + data.draw(st.sampled_from([0, 0, 1, -1, 3]))
            row["labels"] = data.draw(st.lists(st.integers(-1, 1), min_size=max(size, 0), max_size=max(size, 0)))
        else:
            size = len(response)
            row["spans"] = data.draw(st.lists(st.fixed_dictionaries({  # mostly inside the response, sometimes not
                "start": st.integers(-1, size), "end": st.integers(0, size + 1),
                "label": st.one_of(st.integers(-1, 1), st.integers(-1, 1), numbers)}), max_size=2))
        rows.append(data.draw(mutated(row, list(row))))
    check(rows, len(rows), CompletionData, skip, tokenizer)


@FUZZ
@given(rows=st.lists(st.one_of(
    st.builds(lambda t: {"text": t}, good_texts),
    st.builds(lambda p, c: {"prompt": p, "completion": c}, good_texts, good_texts),
    st.builds(lambda p, c: {"messages": said("user", p) + said("assistant", c)}, good_texts, good_texts),
    st.builds(lambda p: {"prompt": p}, st.one_of(good_texts, st.builds(lambda p: said("user", p), good_texts))),
).flatmap(lambda row: mutated(row, list(row))), min_size=1, max_size=4), skip=st.booleans(), t=st.integers(0, 3))
def test_sft_and_prompt_rows(rows, skip, t):
    check(rows, len(rows), CompletionData, skip, TOKENIZERS[t])
