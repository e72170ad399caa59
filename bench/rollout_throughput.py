"""Rollout throughput: finegrain's sampler (:func:`finegrain.rl.rollout.sample_rollouts`) vs ``model.generate``.

Both decode the same left-padded prompts with the same randomly initialised Llama, the same sampling settings
and, for each repetition, the same seed of the global RNG (finegrain's warpers follow ``transformers``', so the
two normally sample identical tokens; the script reports whether they did). Throughput counts only generated
tokens up to and including each row's first EOS, or up to ``max_new_tokens`` when no EOS came. The two
measurements are interleaved (alternating which goes first) and repeated; the script prints per-repetition
numbers, medians and best runs, and the ratio finegrain / transformers (target >= 0.9) as the median of the
per-repetition ratios (robust to load from other processes), beside the best/best and median/median ratios.

Usage (defaults: hidden 256, 4 layers, vocab 4096, batch 32, prompts of 8-32 tokens, 64 new tokens):

    .venv/bin/python bench/rollout_throughput.py
    .venv/bin/python bench/rollout_throughput.py --repeats 3 --new-tokens 16     # a quick run
    .venv/bin/python bench/rollout_throughput.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from finegrain.rl.rollout import sample_rollouts

BOS, EOS, PAD = 1, 2, 0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(args):
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.max_prompt + args.new_tokens + 8,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg).to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.batch,), generator=g)
    width = int(lengths.max())
    ids = torch.full((args.batch, width), PAD, dtype=torch.long)
    attn = torch.zeros(args.batch, width, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, width - n] = BOS
        ids[i, width - n + 1 :] = torch.randint(3, args.vocab, (n - 1,), generator=g)
        attn[i, width - n :] = 1
    return model, ids.to(args.device), attn.to(args.device)


def counted_tokens(tokens: torch.Tensor) -> int:
    """Generated tokens up to and including the first EOS of each row (all of them when there is none)."""
    is_eos = tokens == EOS
    return int(((is_eos.long().cumsum(1) - is_eos.long()) == 0).sum())


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_finegrain(model, ids, attn, args):
    batch = sample_rollouts(
        model, ids, attn, max_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, eos_token_id=EOS, pad_token_id=PAD,
    )
    return batch.completion_input_ids


@torch.no_grad()
def run_transformers(model, ids, attn, args):
    out = model.generate(
        ids, attention_mask=attn, max_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, eos_token_id=EOS, pad_token_id=PAD,
    )
    return out[:, ids.shape[1] :]


def timed(fn, model, ids, attn, args, seed):
    torch.manual_seed(seed)
    _sync(args.device)
    start = time.perf_counter()
    tokens = fn(model, ids, attn, args)
    _sync(args.device)
    return time.perf_counter() - start, tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min-prompt", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="also print one JSON line with the results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, ids, attn = build(args)
    runners = {"finegrain": run_finegrain, "transformers": run_transformers}
    for fn in runners.values():  # warm-up: allocator, kernels, lazy imports
        timed(fn, model, ids, attn, args, args.seed)

    rates = {name: [] for name in runners}
    identical = 0
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} hidden={args.hidden} "
          f"layers={args.layers} vocab={args.vocab} batch={args.batch} new_tokens={args.new_tokens}")
    for rep in range(args.repeats):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        seed = args.seed + 1 + rep
        tokens = {}
        line = []
        for name in order:
            seconds, toks = timed(runners[name], model, ids, attn, args, seed)
            tokens[name] = toks
            count = counted_tokens(toks)
            rates[name].append(count / seconds)
            line.append(f"{name} {count} tok in {seconds:.3f}s = {count / seconds:8.1f} tok/s")
        a, b = tokens["finegrain"], tokens["transformers"]
        same = a.shape[1] <= b.shape[1] and torch.equal(a, b[:, : a.shape[1]]) and bool((b[:, a.shape[1] :] == PAD).all())
        identical += same
        print(f"rep {rep}: " + " | ".join(line) + f" | same tokens: {same}")

    med = {name: statistics.median(v) for name, v in rates.items()}
    best = {name: max(v) for name, v in rates.items()}
    pair_ratios = [f / t for f, t in zip(rates["finegrain"], rates["transformers"])]
    # On a shared machine a neighbour's load slows whichever run it overlaps. The ratio of the paired runs
    # (same seed, back to back) and the ratio of best runs both discount it; the ratio of medians does not.
    ratio = statistics.median(pair_ratios)
    print(f"median tok/s: finegrain {med['finegrain']:.1f}, transformers {med['transformers']:.1f}; "
          f"best tok/s: finegrain {best['finegrain']:.1f}, transformers {best['transformers']:.1f}")
    print(f"ratio finegrain/transformers: median of per-pair ratios {ratio:.3f}, best/best "
          f"{best['finegrain'] / best['transformers']:.3f}, median/median {med['finegrain'] / med['transformers']:.3f}; "
          f"identical samples in {identical}/{args.repeats} repetitions; target >= 0.9")
    if args.json:
        print(json.dumps({"median_tok_s": med, "best_tok_s": best, "pair_ratios": pair_ratios, "ratio": ratio,
                          "identical": identical, "args": vars(args)}))
    return ratio


if __name__ == "__main__":
    main()
