"""Sentence-RM cost: forward + backward time per batch of the sentence RM against the sequence RM, same backbone.

Both reward models share one randomly initialised Llama backbone (built from a config, nothing downloaded) and
score the same preference batch (``pairs`` pairs of world-style responses of ``sentences`` sentences of about
``sentence_tokens`` tokens each); the
timed step is ``model(batch)`` -> Bradley-Terry loss -> ``backward()``, with gradients cleared outside the timer.
The models run interleaved (sequence, sentence-mark, sentence-insert, in a rotating order) for ``repeats`` rounds
after ``warmup`` untimed rounds, and the medians are compared in the same process, so machine noise hits all of them
alike. Two sentence-RM modes:

* ``mark``: the same token ids as the sequence RM, boundaries marked on the last token of each sentence -- the
  pure cost of the SRM aggregation (target: <= 1.1x the sequence RM);
* ``insert``: ``<END>`` tokens inserted after the prompt and every sentence, i.e. ``sentences + 1`` more tokens per
  row, as in the SRM code -- the aggregation plus the longer sequences.

The sentence splitting and boundary preparation are data-side work, done once per example; their time per batch is
reported separately (``prepare_ms``). ``--edit_pairs N`` also runs the edit-labelling throughput of
bench/edit_labels.py (imported, not duplicated) on N synthetic pairs.

Usage:

    .venv/bin/python bench/rm_speed.py                       # prints JSON, writes bench/results/rm_speed.json
    .venv/bin/python bench/rm_speed.py --sentence_tokens 20 --out bench/results/rm_speed_long.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


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


def _step(model, batch, B: int) -> float:
    from finegrain.losses.bt import bradley_terry_loss

    start = time.perf_counter()
    out = model(batch)
    scores = out if isinstance(out, torch.Tensor) else out.score
    bradley_terry_loss(scores[:B], scores[B:]).losses.mean().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def run(*, hidden_size: int = 256, layers: int = 4, heads: int = 4, pairs: int = 8, sentences: int = 8,
        sentence_tokens: int = 6, embed_dim: int = 128, repeats: int = 40, warmup: int = 5, seed: int = 0, threads: int | None = None,
        edit_pairs: int = 0) -> dict:
    """Measure and return the timings (milliseconds, medians) and the ratios to the sequence RM."""
    from finegrain.data.collate import collate_preferences
    from finegrain.models.build import causal_lm_from_config, tiny_llama_config
    from finegrain.models.reward_model import (
        PunctuationSplitter,
        build_reward_model,
        collate_sentence_examples,
    )
    from finegrain.world.tokenizer import build_tokenizer

    if threads:
        torch.set_num_threads(threads)
    rng = random.Random(seed)
    tok = build_tokenizer()
    config = tiny_llama_config(len(tok) + 8, hidden_size=hidden_size, num_layers=layers, num_heads=heads,
                               max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    backbone = causal_lm_from_config(config, seed=seed)
    splitter = PunctuationSplitter()
    models = {
        "sequence": build_reward_model("sequence", backbone, tok, seed=seed),
        "sentence_mark": build_reward_model("sentence", backbone, tok, boundary_mode="mark", embed_dim=embed_dim,
                                            splitter=splitter, seed=seed),
        "sentence_insert": build_reward_model("sentence", backbone, tok, boundary_mode="insert", embed_dim=embed_dim,
                                              splitter=splitter, seed=seed),
    }
    for m in models.values():
        m.train()
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

    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for n in order:
            t = _step(models[n], batches[n], pairs)
            if r >= warmup:
                times[n].append(t)
    med = {n: 1000 * statistics.median(v) for n, v in times.items()}
    quartiles = {n: [round(1000 * q, 2) for q in statistics.quantiles(v, n=4)[::2]] for n, v in times.items()}
    seq_tokens = batches["sequence"].completion_input_ids.shape[1] + batches["sequence"].prompt_input_ids.shape[1]
    ins = batches["sentence_insert"]
    result = {
        "device": "cpu", "threads": torch.get_num_threads(), "hidden_size": hidden_size, "layers": layers,
        "pairs": pairs, "rows": 2 * pairs, "sentences": sentences, "sentence_tokens": sentence_tokens,
        "repeats": repeats,
        "sequence_length": seq_tokens,
        "insert_sequence_length": ins.completion_input_ids.shape[1] + ins.prompt_input_ids.shape[1],
        "median_ms": {n: round(v, 2) for n, v in med.items()},
        "quartiles_ms": quartiles,
        "ratio_mark": round(med["sentence_mark"] / med["sequence"], 3),
        "ratio_insert": round(med["sentence_insert"] / med["sequence"], 3),
        "prepare_ms": {k: round(v, 2) for k, v in prepare_ms.items()},
        "target": "sentence RM forward+backward <= 1.1x the sequence RM's (mark mode: the same batch)",
    }
    result["meets_target"] = result["ratio_mark"] <= 1.1
    if edit_pairs:
        result["edit_labels"] = _edit_label_throughput(edit_pairs, seed)
    return result


def _edit_label_throughput(n: int, seed: int) -> list[dict]:
    """bench/edit_labels.py on ``n`` synthetic pairs (its functions, imported from the file)."""
    from finegrain.data.alignment import label_revisions

    spec = importlib.util.spec_from_file_location("finegrain_bench_edit_labels", HERE / "edit_labels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = random.Random(seed)
    vocab = mod.make_vocabulary(rng, 500)
    rejected, revised = mod.make_pairs(rng, vocab, n)
    tokenizer = mod.make_tokenizer(vocab)
    out = []
    for unit in ("word", "token"):
        start = time.perf_counter()
        label_revisions(tokenizer, rejected, revised, unit=unit)
        seconds = time.perf_counter() - start
        out.append({"unit": unit, "pairs": n, "seconds": round(seconds, 3), "pairs_per_second": round(n / seconds)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=8)
    parser.add_argument("--sentence_tokens", type=int, default=6, help="tokens per sentence (the world's are 4-8)")
    parser.add_argument("--embed_dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--edit_pairs", type=int, default=0, help="also time edit labelling of N pairs")
    parser.add_argument("--out", default=str(HERE / "results" / "rm_speed.json"))
    args = parser.parse_args()
    result = run(hidden_size=args.hidden_size, layers=args.layers, heads=args.heads, pairs=args.pairs,
                 sentences=args.sentences, sentence_tokens=args.sentence_tokens, embed_dim=args.embed_dim, repeats=args.repeats, warmup=args.warmup,
                 seed=args.seed, threads=args.threads, edit_pairs=args.edit_pairs)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
