"""Sentence-RM cost: forward + backward time per batch of the sentence RM against the sequence RM, same backbone.

The reward models share one randomly initialised Llama backbone (built from a config, nothing downloaded) and score
the same preference batch (``pairs`` pairs of world-style responses of ``sentences`` sentences of about
``sentence_tokens`` tokens each, the world's word-level tokenizer); the timed step is ``model(batch)`` ->
Bradley-Terry loss -> ``backward()``, with gradients cleared outside the timer. The models run interleaved
(sequence, sentence-mark, sentence-insert, in a rotating order) for ``repeats`` rounds after ``warmup`` untimed
rounds, and the medians are compared in the same process, so machine noise hits all of them alike. Two sentence-RM
modes:

* ``mark``: the same token ids as the sequence RM, boundaries marked on the last token of each sentence: the pure
  cost of the SRM aggregation;
* ``insert``: ``<END>`` tokens inserted after the prompt and every sentence, i.e. ``sentences + 1`` more tokens per
  row, as in the SRM code: the aggregation plus the longer sequences.

Sentence splitting and boundary preparation are data-side work, done once per example; their time per batch is
reported separately (``prepare_ms``). ``edit_pairs`` > 0 also runs :mod:`finegrain.bench.edit_labels` on that many
pairs and attaches its result.

Usage::

    finegrain bench rm_speed
    .venv/bin/python bench/rm_speed.py --sentence_tokens 20 --out bench/results/rm_speed_long.json
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch

from finegrain.bench.cli import make_main

QUICK = dict(hidden_size=64, layers=2, pairs=4, sentences=4, repeats=6, warmup=1)
GPU = dict(hidden_size=2048, layers=8, heads=16, pairs=16, sentences=16, sentence_tokens=20, repeats=20, warmup=3,
           bf16=True)
GPU_QUICK = dict(GPU, repeats=5, warmup=2)
MODELS = ("sequence", "sentence_mark", "sentence_insert")


def _responses(rng: random.Random, n: int, sentences: int, sentence_tokens: int) -> list[str]:
    """World-style responses: ``sentences`` sentences "it is a and b and ... ." of about ``sentence_tokens`` tokens."""
    from finegrain.world.lexicon import ADJECTIVES

    k = max(1, (sentence_tokens - 2) // 2)  # "it is" + k adjectives joined by "and" + "." = 2k + 2 tokens
    return [" ".join("it is " + " and ".join(rng.choices(ADJECTIVES, k=k)) + " ." for _ in range(sentences))
            for _ in range(n)]


def _examples(tok, rng, pairs: int, sentences: int, sentence_tokens: int) -> list[dict]:
    from finegrain.data.tokenize import tokenize_prompt, tokenize_response

    rows = []
    for chosen, rejected in zip(_responses(rng, pairs, sentences, sentence_tokens),
                                _responses(rng, pairs, sentences, sentence_tokens)):
        row = {"prompt_input_ids": tokenize_prompt(tok, "describe the river .")}
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            ids, offs, _ = tokenize_response(tok, text)
            row.update({f"{name}_input_ids": ids, f"{name}_offsets": offs, f"{name}_text": text})
        rows.append(row)
    return rows


def _step(model, batch, pairs: int, device: str) -> float:
    from finegrain.bench.measure import timed
    from finegrain.losses.bt import bradley_terry_loss

    def forward_backward():
        out = model(batch)
        scores = out if isinstance(out, torch.Tensor) else out.score
        bradley_terry_loss(scores[:pairs], scores[pairs:]).losses.mean().backward()

    seconds = timed(device, forward_backward)[0]
    model.zero_grad(set_to_none=True)
    return seconds


def run(*, hidden_size: int = 256, layers: int = 4, heads: int = 4, pairs: int = 8, sentences: int = 8,
        sentence_tokens: int = 6, embed_dim: int = 128, repeats: int = 40, warmup: int = 5, seed: int = 0,
        threads: int | None = None, edit_pairs: int = 0, device: str = "cpu", bf16: bool = False) -> dict:
    """Time the three reward models interleaved; returns the result dict (``ratios`` to the sequence RM)."""
    from finegrain.bench.synthetic import LlamaShape, build_model
    from finegrain.data.collate import collate_preferences
    from finegrain.models.reward_model import (
        PunctuationSplitter,
        build_reward_model,
        collate_sentence_examples,
    )
    from finegrain.world.tokenizer import build_tokenizer

    if repeats < 2 or warmup < 0 or pairs < 1 or sentences < 1:
        raise ValueError("need repeats >= 2, warmup >= 0, pairs >= 1 and sentences >= 1")
    if threads:
        torch.set_num_threads(threads)
    rng = random.Random(seed)
    tok = build_tokenizer()  # pad, BOS and EOS are 0, 1 and 2, as build_model's config has them
    backbone = build_model(LlamaShape(hidden=hidden_size, layers=layers, heads=heads, vocab=len(tok) + 8),
                           max(1024, sentences * (sentence_tokens + 2) + 16), seed=seed)
    splitter = PunctuationSplitter()
    models = {"sequence": build_reward_model("sequence", backbone, tok, seed=seed),
              **{f"sentence_{mode}": build_reward_model("sentence", backbone, tok, boundary_mode=mode,
                                                         embed_dim=embed_dim, splitter=splitter, seed=seed)
                 for mode in ("mark", "insert")}}
    for m in models.values():
        m.to(device).train()
    examples = _examples(tok, rng, pairs, sentences, sentence_tokens)
    pad = tok.pad_token_id
    batches = {"sequence": collate_preferences(
        [{k: ex[k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")} for ex in examples], pad)}
    prepare_ms = {}
    for mode in ("mark", "insert"):
        model = models[f"sentence_{mode}"]
        start = time.perf_counter()
        prepared = [model.prepare(ex["prompt_input_ids"], ex[f"{side}_input_ids"], ex[f"{side}_text"],
                                  ex[f"{side}_offsets"]) for side in ("chosen", "rejected") for ex in examples]
        batches[f"sentence_{mode}"] = collate_sentence_examples(prepared, pad)
        prepare_ms[mode] = 1000 * (time.perf_counter() - start)
    batches = {k: b.to(device) for k, b in batches.items()}

    times: dict[str, list[float]] = {n: [] for n in MODELS}
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)
    for r in range(warmup + repeats):
        order = MODELS[r % len(MODELS):] + MODELS[: r % len(MODELS)]  # rotate who goes first
        for n in order:
            with autocast:
                t = _step(models[n], batches[n], pairs, device)
            if r >= warmup:
                times[n].append(t)
    med = {n: 1000 * statistics.median(v) for n, v in times.items()}
    seq = batches["sequence"]
    ins = batches["sentence_insert"]
    result = {
        "benchmark": "rm_speed",
        "settings": dict(hidden_size=hidden_size, layers=layers, heads=heads, pairs=pairs, rows=2 * pairs,
                         sentences=sentences, sentence_tokens=sentence_tokens, embed_dim=embed_dim, repeats=repeats,
                         warmup=warmup, seed=seed, device=device, bf16=bf16, threads=torch.get_num_threads(),
                         sequence_length=seq.completion_input_ids.shape[1] + seq.prompt_input_ids.shape[1],
                         insert_sequence_length=ins.completion_input_ids.shape[1] + ins.prompt_input_ids.shape[1]),
        "ratios": {"sentence_mark/sequence": med["sentence_mark"] / med["sequence"],
                   "sentence_insert/sequence": med["sentence_insert"] / med["sequence"]},
        "meaning": {"sentence_mark/sequence": "forward + backward time per batch: sentence RM (boundaries marked, the "
                                              "same tokens) / sequence RM, same backbone and batch",
                    "sentence_insert/sequence": "the same with <END> tokens inserted (sentences + 1 more tokens per "
                                                "row) / sequence RM"},
        "figures": {**{f"{n}_ms": {"value": v, "unit": "ms", "note": "median per batch"} for n, v in med.items()},
                    **{f"prepare_{k}_ms": {"value": v, "unit": "ms", "note": "data-side, once per batch of examples"}
                       for k, v in prepare_ms.items()}},
        "median_ms": med,
        "quartiles_ms": {n: statistics.quantiles(v, n=4)[::2] for n, v in times.items()},
    }
    if edit_pairs:
        from finegrain.bench import edit_labels

        result["edit_labels"] = edit_labels.run(pairs=edit_pairs, seed=seed)
    return result


main = make_main(run, __doc__, help={"bf16": "bfloat16 autocast"}, json_flags=("--out", "--json"),
                 json_default=str(Path("bench") / "results" / "rm_speed.json"))

