"""Edit-label throughput: :func:`finegrain.data.alignment.label_revisions` on synthetic revision pairs.

Each pair is a random sequence of 12-35 words from a 500-word vocabulary (words and punctuation), about 15-70
tokens (39 on average), and a copy with 1-4 random word edits (substitute / delete / insert). The tokenizer is a
small BPE trained here on the same vocabulary, so some words are split into several tokens, as with a real policy
tokenizer; training it is not timed. The timed call tokenizes both sides in one batched fast-tokenizer call each,
aligns every pair with rapidfuzz and projects the labels onto the tokens through character offsets.
Target: 10,000 pairs in under 30 s on 2 CPU cores.

Usage:

    .venv/bin/python bench/edit_labels.py                          # 10,000 pairs, unit=word and unit=token
    .venv/bin/python bench/edit_labels.py --pairs 2000 --units word
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from finegrain.data.alignment import label_revisions


def make_vocabulary(rng: random.Random, size: int) -> list[str]:
    words = {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 11))) for _ in range(size)}
    return sorted(words) + [",", ".", "!", "?"]


def make_pairs(rng: random.Random, vocab: list[str], n: int) -> tuple[list[str], list[str]]:
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


def make_tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<pad>"], show_progress=False)
    tok.train_from_iterator([" ".join(vocab)] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--units", nargs="+", default=["word", "token"], choices=["word", "token", "char"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    vocab = make_vocabulary(rng, 500)
    rejected, revised = make_pairs(rng, vocab, args.pairs)
    tokenizer = make_tokenizer(vocab)
    lengths = [len(ids) for ids in tokenizer(rejected, add_special_tokens=False)["input_ids"]]
    print(f"{args.pairs} pairs; rejected responses of {min(lengths)}-{max(lengths)} tokens, "
          f"{sum(lengths) / len(lengths):.1f} on average")

    for unit in args.units:
        start = time.perf_counter()
        out = label_revisions(tokenizer, rejected, revised, unit=unit)
        seconds = time.perf_counter() - start
        changed = sum(-1 in o.rejected_labels or 1 in o.revised_labels for o in out)
        print(json.dumps({
            "unit": unit,
            "pairs": args.pairs,
            "seconds": round(seconds, 3),
            "pairs_per_second": round(args.pairs / seconds),
            "pairs_with_labels": changed,
        }))


if __name__ == "__main__":
    main()
