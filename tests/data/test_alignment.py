"""Edit alignment and edit-derived token labels (docs/methods/tlcr.md), against a naive Levenshtein DP."""

import doctest
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import finegrain.data.alignment as alignment
from finegrain.data.alignment import (
    edit_tags,
    edit_token_labels,
    label_revisions,
    tag_labels,
    unit_spans,
)
from finegrain.data.tokenize import spans_to_labels
from finegrain.errors import ConfigError, DataError


def label_revision(tokenizer, rejected, revised, **kwargs):
    """One pair through :func:`label_revisions`."""
    return label_revisions(tokenizer, [rejected], [revised], **kwargs)[0]


WORDS = (
    "the a cat dog sat ran on under mat rug quickly slowly unbelievable remarkable results were good bad "
    "café naïve 日本語 über straße , . !"
).split()


def naive_levenshtein_tags(source, target):
    """Unit-cost Levenshtein by full DP table and back-trace: (source_tags, target_tags, distance)."""
    n, m = len(source), len(target)
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        d[i][0] = i
    for j in range(m + 1):
        d[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            sub = d[i - 1][j - 1] + (source[i - 1] != target[j - 1])
            d[i][j] = min(sub, d[i - 1][j] + 1, d[i][j - 1] + 1)
    src, tgt = ["U"] * n, ["U"] * m
    i, j = n, m
    while i or j:
        if i and j and d[i][j] == d[i - 1][j - 1] + (source[i - 1] != target[j - 1]):
            if source[i - 1] != target[j - 1]:
                src[i - 1] = tgt[j - 1] = "S"
            i, j = i - 1, j - 1
        elif i and d[i][j] == d[i - 1][j] + 1:
            src[i - 1] = "D"
            i -= 1
        else:
            tgt[j - 1] = "A"
            j -= 1
    return src, tgt, d[n][m]


def apply_script(source, target, src_tags, tgt_tags):
    """Apply the edit script the tags describe to ``source``; U/S pairs are matched in order."""
    assert len(src_tags) == len(source) and len(tgt_tags) == len(target)
    assert set(src_tags) <= {"U", "S", "D"} and set(tgt_tags) <= {"U", "S", "A"}
    out, i, k = [], 0, 0
    while i < len(source) or k < len(target):
        if i < len(source) and src_tags[i] == "D":
            i += 1
        elif k < len(target) and tgt_tags[k] == "A":
            out.append(target[k])
            k += 1
        else:
            assert i < len(source) and k < len(target) and src_tags[i] == tgt_tags[k], "U/S tags do not pair up"
            out.append(source[i] if src_tags[i] == "U" else target[k])
            i, k = i + 1, k + 1
    return out


def cost(src_tags, tgt_tags):
    return sum(t != "U" for t in src_tags) + sum(t == "A" for t in tgt_tags)


def random_edit(rng, seq, alphabet, n_edits):
    seq = list(seq)
    for _ in range(n_edits):
        op = rng.choice("sdi") if seq else "i"
        pos = rng.randrange(len(seq) + (op == "i"))
        if op == "s":
            seq[pos] = rng.choice(alphabet)
        elif op == "d":
            del seq[pos]
        else:
            seq.insert(pos, rng.choice(alphabet))
    return seq


@pytest.fixture(scope="module")
def word_tokenizer():
    """Word-level fast tokenizer: one token per whitespace-separated word."""
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """Tiny BPE trained in-test: long words split into several tokens."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=70, special_tokens=["[UNK]", "[PAD]"], show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def test_doctests():
    assert doctest.testmod(alignment, raise_on_error=False).failed == 0


def test_naive_dp_self_check():
    src, tgt, dist = naive_levenshtein_tags("kitten", "sitting")
    assert dist == 3 and cost(src, tgt) == 3
    assert apply_script("kitten", "sitting", src, tgt) == list("sitting")


def test_edit_tags_hand_example():
    assert edit_tags(["the", "cat", "sat"], ["the", "dog", "sat", "down"]) == (["U", "S", "U"], ["U", "S", "U", "A"])
    assert edit_tags([1, 2, 3], []) == (["D", "D", "D"], [])
    assert edit_tags([], [4]) == ([], ["A"])
    assert edit_tags([], []) == ([], [])


@pytest.mark.parametrize("kind", ["ints", "unicode"])
def test_edit_tags_match_naive_dp_on_random_sequences(kind):
    """rapidfuzz's script is minimal (cost = naive DP distance) and valid (applying it yields the target)."""
    rng = random.Random(0)
    alphabet = list(range(5)) if kind == "ints" else list("aé日本 ßü.!")
    for _ in range(300):
        source = [rng.choice(alphabet) for _ in range(rng.randrange(0, 13))]
        target = random_edit(rng, source, alphabet, rng.randrange(0, 5)) if rng.random() < 0.7 else [
            rng.choice(alphabet) for _ in range(rng.randrange(0, 13))
        ]
        if kind == "unicode":
            source, target = "".join(source), "".join(target)
        src_tags, tgt_tags = edit_tags(source, target)
        naive_src, naive_tgt, dist = naive_levenshtein_tags(source, target)
        assert cost(src_tags, tgt_tags) == dist
        assert apply_script(source, target, src_tags, tgt_tags) == list(target)
        assert apply_script(source, target, naive_src, naive_tgt) == list(target)


def test_tag_labels():
    assert tag_labels(["U", "S", "D", "U"], ["S", "A", "U"]) == ([0, -1, -1, 0], [1, 1, 0])


def test_unit_spans_words_and_chars():
    text = "Hi, naïve 日本語!"
    assert [text[s:e] for s, e in unit_spans(text, "word")] == ["Hi", ",", "naïve", "日本語", "!"]
    assert unit_spans("ab", "char") == [(0, 1), (1, 2)]
    with pytest.raises(ConfigError):
        unit_spans("ab", "token")


def test_changed_spans_label_tokens_as_the_character_loop():
    """edit_token_labels labels tokens by the changed units (sorted, disjoint spans) through spans_to_labels."""
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randrange(1, 30)
        cuts = sorted(rng.sample(range(n + 1), rng.randrange(1, min(n + 1, 8))))
        offsets = [(a, b) for a, b in zip(cuts, cuts[1:])] + [(cuts[-1], cuts[-1])]
        ends = sorted(rng.sample(range(n + 1), 2 * rng.randrange(0, (n + 1) // 2 + 1)))
        changed = list(zip(ends[::2], ends[1::2]))
        got = spans_to_labels(offsets, [(a, b, -1) for a, b in changed], fill=0)
        chars = {c for a, b in changed for c in range(a, b)}
        assert got == [-1 if any(c in chars for c in range(a, b)) else 0 for a, b in offsets]


def test_word_level_labels(word_tokenizer):
    out = label_revision(word_tokenizer, "the cat sat on the mat", "the dog sat under the mat quickly")
    assert out.rejected_labels == [0, -1, 0, -1, 0, 0]
    assert out.revised_labels == [0, 1, 0, 1, 0, 0, 1]
    assert not out.identical and out.distance == 3
    assert len(out.rejected_input_ids) == 6 and out.revised_offsets[1] == (4, 7)


def test_deletion_marks_only_the_rejected_side(word_tokenizer):
    out = label_revision(word_tokenizer, "the cat sat quickly", "the cat sat")
    assert out.rejected_labels == [0, 0, 0, -1] and out.revised_labels == [0, 0, 0]


@pytest.mark.parametrize("unit", ["word", "token", "char"])
def test_identical_texts_are_flagged(word_tokenizer, unit):
    out = label_revision(word_tokenizer, "the cat sat", "the cat sat", unit=unit)
    assert out.identical and out.distance == 0
    assert out.rejected_labels == [0, 0, 0] and out.revised_labels == [0, 0, 0]


def test_whitespace_only_change_is_no_word_edit(word_tokenizer):
    out = label_revision(word_tokenizer, "the  cat sat", "the cat\nsat")
    assert out.identical and set(out.rejected_labels) == {0}


def test_multi_token_words(bpe_tokenizer):
    """A changed word marks all its sub-word tokens with unit='word', only the differing ones with unit='token'."""
    rejected, revised = "unbelievable results", "remarkable results"
    enc = bpe_tokenizer(rejected, add_special_tokens=False, return_offsets_mapping=True)
    n_first = sum(e <= len("unbelievable") for _, e in enc["offset_mapping"])
    assert n_first > 1, "the test needs a word split into several tokens"

    word = label_revision(bpe_tokenizer, rejected, revised)
    assert word.rejected_labels == [-1] * n_first + [0] * (len(word.rejected_labels) - n_first)
    assert all(lab == 0 for lab, (s, _) in zip(word.revised_labels, word.revised_offsets) if s >= len("remarkable"))
    assert word.revised_labels[0] == 1

    tok = label_revision(bpe_tokenizer, rejected, revised, unit="token")
    assert set(tok.rejected_labels[n_first:]) == {0}
    # Projection check: with unit="token" the labels are the token tags themselves.
    src, tgt = edit_tags(tok.rejected_input_ids, tok.revised_input_ids)
    assert (tok.rejected_labels, tok.revised_labels) == tag_labels(src, tgt)


def test_word_labels_on_random_pairs_match_naive_projection(bpe_tokenizer):
    """Random word sequences with a few edits: labels equal a per-character projection of the word tags, and
    the word tags are a minimal edit script."""
    rng = random.Random(2)
    rejected_texts, revised_texts = [], []
    for _ in range(40):
        words = [rng.choice(WORDS) for _ in range(rng.randrange(1, 12))]
        rejected_texts.append(" ".join(words))
        revised_texts.append(" ".join(random_edit(rng, words, WORDS, rng.randrange(0, 4))))
    outs = label_revisions(bpe_tokenizer, rejected_texts, revised_texts)
    for rej, rev, out in zip(rejected_texts, revised_texts, outs):
        rej_spans, rev_spans = unit_spans(rej, "word"), unit_spans(rev, "word")
        rej_units = [rej[s:e] for s, e in rej_spans]
        rev_units = [rev[s:e] for s, e in rev_spans]
        src_tags, tgt_tags = edit_tags(rej_units, rev_units)
        assert cost(src_tags, tgt_tags) == naive_levenshtein_tags(rej_units, rev_units)[2] == out.distance
        for spans, tags, offsets, labels, value in (
            (rej_spans, src_tags, out.rejected_offsets, out.rejected_labels, -1),
            (rev_spans, tgt_tags, out.revised_offsets, out.revised_labels, 1),
        ):
            changed = {c for (s, e), t in zip(spans, tags) if t != "U" for c in range(s, e)}
            assert labels == [value if changed & set(range(s, e)) else 0 for s, e in offsets]
        assert out.identical == (rej_units == rev_units)


def test_unicode_offsets_are_characters(bpe_tokenizer):
    out = label_revision(bpe_tokenizer, "café über naïve", "café straße naïve")
    assert [lab for lab, (s, e) in zip(out.rejected_labels, out.rejected_offsets) if s >= 5 and e <= 9] != []
    for lab, (s, e) in zip(out.rejected_labels, out.rejected_offsets):
        assert lab == (-1 if 5 <= s and e <= 9 else 0)


def test_empty_side(word_tokenizer):
    out = label_revision(word_tokenizer, "", "the cat")
    assert out.rejected_labels == [] and out.revised_labels == [1, 1] and not out.identical
    both = label_revision(word_tokenizer, "", "")
    assert both.identical and both.rejected_labels == [] == both.revised_labels


def test_bad_input():
    with pytest.raises(DataError, match="outside the text"):
        edit_token_labels("the cat", "the dog", [(0, 3), (4, 9)], [(0, 3), (4, 7)])
    with pytest.raises(DataError, match="start > end|outside"):
        edit_token_labels("the cat", "the dog", [(3, 0)], [(0, 3)])
    with pytest.raises(DataError, match="pairs"):
        edit_token_labels("the cat", "the dog", [0, 3], [(0, 3)])
    with pytest.raises(DataError, match="token ids"):
        edit_token_labels("a b", "a c", [(0, 1), (2, 3)], [(0, 1), (2, 3)], unit="token", rejected_ids=[1])
    with pytest.raises(ConfigError):
        edit_token_labels("a", "b", [(0, 1)], [(0, 1)], unit="sentence")


def test_label_revisions_bad_input(word_tokenizer):
    with pytest.raises(DataError, match="2 rejected responses but 1"):
        label_revisions(word_tokenizer, ["a", "b"], ["a"])

    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="fast tokenizer"):
        label_revision(Slow(), "a", "b")
