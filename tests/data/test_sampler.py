"""Batch order: deterministic per (seed, epoch), resumable without loss or repeat, shardable over processes."""

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finegrain.data.prepared import CompletionData, PreferenceData
from finegrain.data.sampler import batch_indices, check_divisible, num_batches, shard_batch
from finegrain.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_tokenizers import word_tokenizer  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "is", "blue", "red", "sky"]


def pairs(n):
    return [{"prompt": f"{WORDS[i % 10]} {WORDS[i // 10 % 10]}", "chosen": WORDS[i % 7], "rejected": f"{WORDS[i % 7]} ."}
            for i in range(n)]


def test_an_epoch_is_a_permutation_and_seeded():
    b = batch_indices(10, 3, seed=1, epoch=0, drop_last=False)
    assert [len(x) for x in b] == [3, 3, 3, 1] and sorted(sum(b, [])) == list(range(10))
    assert b == batch_indices(10, 3, seed=1, epoch=0, drop_last=False)
    assert b != batch_indices(10, 3, seed=1, epoch=1, drop_last=False)
    assert b != batch_indices(10, 3, seed=2, epoch=0, drop_last=False)
    assert batch_indices(10, 3, seed=1, epoch=0) == b[:3]  # drop_last drops the short batch only
    assert batch_indices(4, 2, seed=0, epoch=0, shuffle=False) == [[0, 1], [2, 3]]
    assert batch_indices(0, 2, seed=0, epoch=0) == []


def test_num_batches_and_bad_sizes():
    assert num_batches(10, 3) == 3 and num_batches(10, 3, drop_last=False) == 4 and num_batches(9, 3, False) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            batch_indices(10, bad, seed=0, epoch=0)
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        check_divisible(6, 4)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 40), bs=st.integers(1, 9), seed=st.integers(0, 2**32), stop=st.integers(0, 12),
       drop_last=st.booleans())
def test_resume_neither_repeats_nor_skips(n, bs, seed, stop, drop_last):
    """Batches run before a stop after batch ``stop - 1``, then the resumed rest, equal the uninterrupted epoch."""
    full = batch_indices(n, bs, seed, epoch=3, drop_last=drop_last)
    before = full[:stop]
    after = batch_indices(n, bs, seed, epoch=3, drop_last=drop_last)[stop:]
    assert before + after == full
    seen = [i for b in before + after for i in b]
    assert len(seen) == len(set(seen)) == (n - n % bs if drop_last else n)


@settings(max_examples=30, deadline=None)
@given(batch=st.lists(st.integers(0, 100), max_size=20), procs=st.integers(1, 8))
def test_shards_concatenate_to_the_global_batch(batch, procs):
    shards = [shard_batch(batch, procs, r) for r in range(procs)]
    assert sum(shards, []) == batch
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_rank_out_of_range():
    with pytest.raises(ConfigError):
        shard_batch([1, 2], 2, 2)


def test_multi_process_run_sees_the_single_process_batches():
    data = PreferenceData.from_source(pairs(23), word_tokenizer())
    single = [b.extras["index"][: b.num_pairs].tolist() for b in data.batches(4, seed=5, epoch=1)]
    assert single == batch_indices(23, 4, seed=5, epoch=1)
    ranks = [[b.extras["index"][: b.num_pairs].tolist() for b in data.batches(4, seed=5, epoch=1, num_processes=2,
                                                                              process_index=r)] for r in range(2)]
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == single


def test_data_batches_resume_mid_epoch():
    data = CompletionData.from_source([{"prompt": "the", "completion": w} for w in WORDS * 2], word_tokenizer())
    full = [b.extras["index"].tolist() for b in data.batches(3, seed=0, epoch=0, drop_last=False)]
    resumed = [b.extras["index"].tolist() for b in data.batches(3, seed=0, epoch=0, drop_last=False, start_batch=4)]
    assert full[4:] == resumed and sorted(sum(full, [])) == list(range(20))


def test_short_final_batch_gives_every_rank_a_batch():
    data = CompletionData.from_source([{"prompt": "the", "completion": w} for w in WORDS[:5]], word_tokenizer())
    per_rank = [list(data.batches(4, seed=0, epoch=0, drop_last=False, num_processes=4, process_index=r))
                for r in range(4)]
    assert [len(b) for b in per_rank] == [2, 2, 2, 2]
    assert [b[1].num_rows for b in per_rank] == [1, 0, 0, 0]


def test_order_and_length_are_stable_and_skips_are_counted():
    rows = pairs(6)
    rows[2] = dict(rows[2], chosen=None)
    a = PreferenceData.from_source(rows, word_tokenizer(), skip_invalid=True)
    b = PreferenceData.from_source(rows, word_tokenizer(), skip_invalid=True)
    assert len(a) == 5 and [ex["row"] for ex in a] == [0, 1, 3, 4, 5] == [ex["row"] for ex in b]
    assert [ex["index"] for ex in a] == list(range(5)) and a.skipped == {"missing value in 'chosen'": 1}


def test_wrong_kind_and_nothing_left():
    with pytest.raises(DataError, match="PreferenceData takes rows of kind preference or revision"):
        PreferenceData.from_source([{"prompt": "p", "completion": "c"}], word_tokenizer())
    with pytest.raises(DataError, match="no usable rows \\(1 read, 1 skipped\\)"):
        PreferenceData.from_source([{"prompt": "p", "chosen": None, "rejected": "r"}], word_tokenizer(), skip_invalid=True)


def test_revisions_train_as_pairs_with_the_revision_chosen():
    rows = [{"prompt": "the sky", "rejected": "is red", "revised": "is blue", "chosen": "blue"}]
    data = PreferenceData.from_source(rows, word_tokenizer(), max_examples=1)
    assert data.kind == "revision" and data[0]["chosen_text"] == "is blue" and data[0]["rejected_text"] == "is red"
    assert data.collate([0]).num_pairs == 1
