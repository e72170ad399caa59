"""Edit-label throughput: :func:`finegrain.data.alignment.label_revisions` on synthetic revision pairs, against the
tokenization it cannot avoid.

Each pair is a random sequence of 12-35 words from a 500-word vocabulary (words and punctuation), about 15-70 tokens
(39 on average), and a copy with 1-4 random word edits (substitute / delete / insert). The tokenizer is a small BPE
trained here on the same vocabulary, so some words are split into several tokens, as with a real policy tokenizer;
training it is not timed. The timed call tokenizes both sides in one batched fast-tokenizer call each, aligns every
pair with rapidfuzz and projects the labels onto the tokens through character offsets. The baseline, timed beside it
on the same pairs, is those two batched tokenizer calls alone (with offsets): the ratio says how many times the bare
tokenization the whole labelling costs. Labelling and baseline alternate for ``repeats`` rounds; medians.

Usage::

    finegrain bench edit_labels                                   # 10,000 pairs, unit=word and unit=token
    .venv/bin/python bench/edit_labels.py --pairs 2000 --units word
"""

from __future__ import annotations

import functools
import random
import statistics
import string

from finegrain.bench.cli import make_main

QUICK = dict(pairs=2000, repeats=2)
GPU = {}
GPU_QUICK = QUICK
UNITS = ("word", "token", "char")


def make_vocabulary(rng: random.Random, size: int) -> list[str]:
    words = {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 11))) for _ in range(size)}
    return sorted(words) + [",", ".", "!", "?"]


def make_pairs(rng: random.Random, vocab: list[str], n: int) -> tuple[list[str], list[str]]:
    """``n`` (rejected, revised) texts: random words and a copy with 1-4 random word edits."""
    rejected, revised = [], []
    for _ in range(n):
        words = rng.choices(vocab, k=rng.randint(12, 35))
        edited = list(words)
        for _ in range(rng.randint(1, 4)):
            op, pos = rng.choice("sdi"), rng.randrange(len(edited))
            if op == "s":
                edited[pos] = rng.choice(vocab)
            elif op == "d" and len(edited) > 1:
                del edited[pos]
            else:
                edited.insert(pos, rng.choice(vocab))
        rejected.append(" ".join(words))
        revised.append(" ".join(edited))
    return rejected, revised


def make_tokenizer(vocab: list[str]):
    """A small BPE tokenizer (1,500 tokens) trained on ``vocab``: long words split into several tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<pad>"], show_progress=False)
    tok.train_from_iterator([" ".join(vocab)] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def run(*, pairs: int = 10_000, units: tuple[str, ...] | list[str] = ("word", "token"), repeats: int = 3,
        seed: int = 0, threads: int | None = None) -> dict:
    """Time labelling and the tokenization baseline; returns the result dict (``ratios``: label / tokenize)."""
    from finegrain.bench.measure import timed
    from finegrain.data.alignment import label_revisions

    bad = [u for u in units if u not in UNITS]
    if bad or not units:
        raise ValueError(f"units must be some of {list(UNITS)}, got {list(units)}")
    if pairs < 1 or repeats < 1:
        raise ValueError("pairs and repeats must be >= 1")
    rng = random.Random(seed)
    vocab = make_vocabulary(rng, 500)
    rejected, revised = make_pairs(rng, vocab, pairs)
    tokenizer = make_tokenizer(vocab)
    lengths = [len(ids) for ids in tokenizer(rejected, add_special_tokens=False)["input_ids"]]

    def tokenize():
        tokenizer(rejected, add_special_tokens=False, return_offsets_mapping=True)
        tokenizer(revised, add_special_tokens=False, return_offsets_mapping=True)

    jobs = {"tokenize": tokenize, **{u: functools.partial(label_revisions, tokenizer, rejected, revised, unit=u)
                                     for u in units}}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    labelled = {}
    for _ in range(repeats):
        for name, job in jobs.items():
            seconds, _, out = timed("cpu", job)
            times[name].append(seconds)
            if name != "tokenize":
                labelled[name] = sum(-1 in o.rejected_labels or 1 in o.revised_labels for o in out)
    med = {k: statistics.median(v) for k, v in times.items()}
    figures = {f"{u}_pairs_per_s": {"value": pairs / med[u], "unit": "pairs/s"} for u in units}
    figures.update({f"{u}_seconds": {"value": med[u], "unit": "s", "note": f"for {pairs} pairs"} for u in units})
    figures["tokenize_seconds"] = {"value": med["tokenize"], "unit": "s", "note": "both sides, batched, offsets"}
    return {
        "benchmark": "edit_labels",
        "settings": dict(pairs=pairs, units=list(units), repeats=repeats, seed=seed, device="cpu",
                         tokens_per_response={"min": min(lengths), "max": max(lengths),
                                              "mean": sum(lengths) / len(lengths)}),
        "ratios": {f"{u}/tokenize": med[u] / med["tokenize"] for u in units},
        "meaning": {f"{u}/tokenize": f"time of label_revisions(unit={u}) / time of tokenizing both sides (the floor)"
                    for u in units},
        "figures": figures, "seconds": times, "pairs_with_labels": labelled,
    }


main = make_main(run, __doc__, choices={"units": UNITS})

