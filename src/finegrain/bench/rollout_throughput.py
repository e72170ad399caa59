"""Rollout throughput: finegrain's sampler (:func:`finegrain.rl.rollout.sample_rollouts`) vs ``model.generate``.

Both decode the same left-padded prompts with the same model, sampling settings and, per repetition, seed of the
global RNG (finegrain's warpers follow ``transformers``', so the two normally sample identical tokens; the result
says in how many repetitions they did). A row's tokens count up to and including its first EOS (all ``new_tokens``
without one). The ratio finegrain / transformers is the median of the per-repetition ratios (robust to load from
other processes), reported beside the best/best and median/median ratios; on CUDA each sampler's MFU too
(:func:`_decode_flops`; decoding is memory-bound, so it only compares the samplers). Interleaving, warm-up and the
GPU sizes: docs/benchmarks.md (rollout_throughput, The GPU path).

Usage (defaults: hidden 256, 4 layers, vocab 4096, batch 32, prompts of 8-32 tokens, 64 new tokens)::

    finegrain bench rollout_throughput
    .venv/bin/python bench/rollout_throughput.py --repeats 3 --new-tokens 16     # a quick run
    .venv/bin/python bench/rollout_throughput.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import statistics

import torch

from finegrain.bench.cli import make_main
from finegrain.bench.synthetic import BOS, EOS, LLAMA_1B, PAD

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK = dict(hidden=64, layers=2, heads=2, vocab=512, batch=8, new_tokens=16, repeats=3)
GPU = dict(LLAMA_1B.as_dict(), batch=64, min_prompt=64, max_prompt=128, new_tokens=256, repeats=5, dtype="bfloat16")
GPU_QUICK = dict(GPU, new_tokens=64, repeats=3)


def build(shape, *, batch: int, min_prompt: int, max_prompt: int, new_tokens: int, seed: int, device: str, dtype: str,
          model_dir: str | None = None):
    """A random Llama of ``shape`` (or the model saved in ``model_dir``; eval mode, SDPA attention) and ``batch``
    left-padded random prompts (BOS, then random token ids from 3 up)."""
    from finegrain.data.collate import collate_completions

    if model_dir is None:
        from finegrain.bench.synthetic import build_model

        model = build_model(shape, max_prompt + new_tokens + 8, seed=seed, attn_implementation="sdpa")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_prompt, max_prompt + 1, (batch,), generator=g).tolist()
    vocab = model.config.vocab_size
    prompts = [[BOS] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]
    b = collate_completions([{"prompt_input_ids": p, "completion_input_ids": []} for p in prompts], PAD)
    return model, b.prompt_input_ids.to(device), b.prompt_attention_mask.to(device)


def counted_tokens(tokens: torch.Tensor, eos: int = EOS) -> torch.Tensor:
    """``(N,)`` generated tokens per row up to and including its first EOS (all of them when there is none)."""
    is_eos = (tokens == eos).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).sum(1)


def _finegrain(model, ids, attn, s):
    from finegrain.rl.rollout import sample_rollouts

    batch = sample_rollouts(model, ids, attn, max_new_tokens=s["new_tokens"], do_sample=True,
                            temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], eos_token_id=s["eos"],
                            pad_token_id=PAD)
    return batch.completion_input_ids


@torch.no_grad()
def _transformers(model, ids, attn, s):
    out = model.generate(ids, attention_mask=attn, max_new_tokens=s["new_tokens"], do_sample=True,
                         temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], eos_token_id=s["eos"],
                         pad_token_id=PAD)
    return out[:, ids.shape[1]:]


RUNNERS = {"finegrain": _finegrain, "transformers": _transformers}


def _timed(fn, model, ids, attn, s, seed):
    from finegrain.bench.measure import timed

    torch.manual_seed(seed)
    return timed(s["device"], fn, model, ids, attn, s)


def _decode_flops(model, attn: torch.Tensor, counts: torch.Tensor) -> float:
    """Model FLOPs of prefilling every prompt and generating ``counts[i]`` tokens after prompt ``i``."""
    from finegrain.models.flops import model_flops

    mf = model_flops(model)
    total = 0.0
    for p, k in zip(attn.sum(1).tolist(), counts.tolist()):
        total += mf.forward(p, 1) + sum(mf.decode(p + j) for j in range(k))
    return total


def run(*, hidden: int = 256, layers: int = 4, heads: int = 4, kv_heads: int | None = None,
        intermediate: int | None = None, vocab: int = 4096, tie_embeddings: bool = True, batch: int = 32,
        min_prompt: int = 8, max_prompt: int = 32, new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, repeats: int = 7, seed: int = 0, device: str = "cpu", dtype: str = "float32",
        threads: int | None = None, model: str | None = None) -> dict:
    """Measure both samplers interleaved; returns the result dict (``ratios``: finegrain / transformers tokens/s).
    ``model``: a saved model directory to sample from instead of a random Llama of the given shape (its EOS id from
    its config)."""
    from finegrain.bench.synthetic import LlamaShape
    from finegrain.models.flops import mfu, peak_bf16_flops

    if repeats < 1 or not 1 <= min_prompt <= max_prompt or new_tokens < 1:
        raise ValueError("need repeats >= 1, 1 <= min_prompt <= max_prompt and new_tokens >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if threads:
        torch.set_num_threads(threads)
    shape = LlamaShape(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                       vocab=vocab, tie_embeddings=tie_embeddings)
    s = dict(batch=batch, min_prompt=min_prompt, max_prompt=max_prompt, new_tokens=new_tokens,
             temperature=temperature, top_k=top_k, top_p=top_p, repeats=repeats, seed=seed, device=device, dtype=dtype,
             eos=EOS, model=model)
    model_dir = model
    model, ids, attn = build(shape, batch=batch, min_prompt=min_prompt, max_prompt=max_prompt, new_tokens=new_tokens,
                             seed=seed, device=device, dtype=dtype, model_dir=model_dir)
    if model_dir is not None:
        eos = model.config.eos_token_id
        s["eos"] = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
        c = model.config
        shape = LlamaShape(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                           kv_heads=c.num_key_value_heads, intermediate=c.intermediate_size, vocab=c.vocab_size,
                           tie_embeddings=bool(c.tie_word_embeddings))
    for fn in RUNNERS.values():  # warm-up: allocator, kernels, lazy imports
        _timed(fn, model, ids, attn, s, seed)
    rates, seconds, cpu_rates, flops = ({n: [] for n in RUNNERS} for _ in range(4))  # name -> one per repetition
    counted: list[float] = []
    identical = 0
    for rep in range(repeats):
        tokens = {}
        for name in list(RUNNERS)[:: 1 if rep % 2 == 0 else -1]:  # alternate which goes first
            sec, cpu, tokens[name] = _timed(RUNNERS[name], model, ids, attn, s, seed + 1 + rep)
            counts = counted_tokens(tokens[name], s["eos"]).cpu()
            rates[name].append(int(counts.sum()) / sec)
            cpu_rates[name].append(int(counts.sum()) / max(cpu, 1e-9))
            seconds[name].append(sec)
            counted.append(float(counts.float().mean()))
            if device == "cuda":
                flops[name].append(_decode_flops(model, attn.cpu(), counts))
        a, b = tokens["finegrain"], tokens["transformers"]
        identical += bool(a.shape[1] <= b.shape[1] and torch.equal(a, b[:, :a.shape[1]])
                          and (b[:, a.shape[1]:] == PAD).all())
    pair = [f / t for f, t in zip(rates["finegrain"], rates["transformers"])]
    cpu_pair = [f / t for f, t in zip(cpu_rates["finegrain"], cpu_rates["transformers"])]
    med = {n: statistics.median(v) for n, v in rates.items()}
    best = {n: max(v) for n, v in rates.items()}
    figures = {f"{n}_tok_s": {"value": med[n], "unit": "tok/s", "note": "median over repetitions"} for n in RUNNERS}
    figures["identical_samples"] = {"value": identical / repeats, "unit": "%",
                                    "note": "repetitions in which both samplers drew the same tokens"}
    figures["tokens_per_row"] = {"value": statistics.fmean(counted), "unit": "tokens",
                                 "note": "generated per row, up to and including the first EOS (mean)"}
    notes = []
    if device == "cuda":
        peak = peak_bf16_flops(torch.cuda.get_device_name())
        if peak is None:
            notes.append(f"MFU omitted: no peak bf16 FLOP/s known for {torch.cuda.get_device_name()!r}")
        else:
            for n in RUNNERS:
                value = statistics.median(mfu(f, t, peak[1]) for f, t in zip(flops[n], seconds[n]))
                figures[f"{n}_mfu"] = {"value": value, "unit": "%",
                                       "note": f"of {peak[0]} dense bf16 peak (decoding is memory-bound)"}
    return {
        "benchmark": "rollout_throughput", "settings": dict(shape.as_dict(), **s, threads=torch.get_num_threads()),
        "ratios": {"finegrain/transformers_tok_s": statistics.median(pair)},
        "meaning": {"finegrain/transformers_tok_s": "rollout tokens/s: finegrain's KV-cache sampler / transformers "
                                                    "generate (median of per-repetition ratios)"},
        "figures": figures, "best_ratio": best["finegrain"] / best["transformers"],
        "median_ratio": med["finegrain"] / med["transformers"], "pair_ratios": pair, "tok_s": rates,
        "cpu_time": {"ratio": statistics.median(cpu_pair), "pair_ratios": cpu_pair, "tok_s": cpu_rates},
        "identical": identical, "notes": notes,
    }


main = make_main(run, __doc__, choices={"dtype": sorted(DTYPES)},
                 help={"model": "a saved model directory (default: a random Llama of the shape above)"})

