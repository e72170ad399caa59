"""Peak memory of TDPO's per-token statistics: chunked from hidden states vs full logits of both models.

Both variants compute, from the final hidden states and output heads of a policy and a reference, the policy and
reference token log-probs and the forward token KL over the full vocabulary, then the TDPO2 loss and its backward
(gradients with respect to the policy's hidden states and head weight):

* ``chunked``: :func:`finegrain.ops.chunked.completion_stats` (masked rows only, ``chunk_size`` rows at a time,
  logits recomputed in backward);
* ``naive``: :func:`finegrain.ops.chunked.naive_completion_stats` (``(N, T, V)`` logits of both models, then
  ``log_softmax``; autograd keeps what it needs).

Each variant runs in a fresh process (:func:`finegrain.bench.measure.run_worker`) that runs a warm-up on tiny shapes
and allocates its inputs, then measures one forward + backward (:class:`finegrain.bench.measure.PeakMemory`).
The parent compares the two variants' values and gradients and reports the ratio chunked / naive of the peaks (the
times of the two single runs are given, not compared). Measured figures: docs/benchmarks.md (tdpo_memory).

Usage (defaults: N = 4 sequences of T = 1024 tokens, V = 32000, H = 256, float32)::

    finegrain bench tdpo_memory
    .venv/bin/python bench/tdpo_memory.py --rows 4 --seq-len 256 --vocab 8000   # a quick run
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from finegrain.bench.cli import make_main

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
QUICK = dict(rows=4, seq_len=256, vocab=8000, hidden=128, chunk_size=256)
GPU = dict(rows=4, seq_len=2048, vocab=128256, hidden=2048, chunk_size=2048, dtype="bfloat16")
GPU_QUICK = dict(GPU, seq_len=512, vocab=32000, chunk_size=512)
VARIANTS = ("chunked", "naive")


def _inputs(rows, seq_len, vocab, hidden, dtype, seed, device):
    """Policy and reference states/heads; the reference is a perturbed copy so that the KL is not trivially 0."""
    dtype = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    n, t, h, v = rows, seq_len, hidden, vocab

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32).mul_(scale).to(device=device, dtype=dtype)

    policy_hidden = rnd(n, t, h)
    policy_weight = rnd(v, h, scale=2.0 / h**0.5)
    ref_hidden = policy_hidden + rnd(n, t, h, scale=0.3)
    ref_weight = policy_weight + rnd(v, h, scale=0.3 / h**0.5)
    labels = torch.randint(0, v, (n, t), generator=g).to(device)
    # ragged responses: row i has t - i * t // 8 tokens, right-padded
    lengths = torch.tensor([max(1, t - i * t // 8) for i in range(n)])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(device)
    return dict(policy_hidden=policy_hidden.requires_grad_(True), policy_weight=policy_weight.requires_grad_(True),
                ref_hidden=ref_hidden, ref_weight=ref_weight, labels=labels, mask=mask)


def _step(variant: str, inp: dict, chunk_size: int):
    from finegrain.losses import tdpo_loss
    from finegrain.ops import masked_sum
    from finegrain.ops.chunked import completion_stats, naive_completion_stats

    fn = completion_stats if variant == "chunked" else naive_completion_stats
    stats = fn(inp["policy_hidden"], inp["policy_weight"], inp["labels"], inp["mask"], ref_hidden=inp["ref_hidden"],
               ref_weight=inp["ref_weight"], compute_kl=True, chunk_size=chunk_size)
    mask = inp["mask"]
    margin = masked_sum(stats.token_logps - stats.ref_token_logps, mask, dim=-1)
    seq_kl = masked_sum(stats.token_kl, mask, dim=-1)
    b = margin.shape[0] // 2  # chosen rows first, then rejected rows
    loss = tdpo_loss(margin[:b], margin[b:], seq_kl[:b], seq_kl[b:], beta=0.1, alpha=0.5, variant="tdpo2").losses.mean()
    loss.backward()
    return stats, loss


def worker(o: dict) -> dict:
    """One variant in this (fresh) process: peak extra memory and time of one forward + backward."""
    from finegrain.bench.measure import PeakMemory, timed

    device = o["device"]
    _step(o["variant"], _inputs(2, 4, 16, o["hidden"], o["dtype"], 0, device), o["chunk_size"])  # warm-up
    inp = _inputs(o["rows"], o["seq_len"], o["vocab"], o["hidden"], o["dtype"], o["seed"], device)
    peak = PeakMemory(device).start()
    seconds, _, (stats, loss) = timed(device, _step, o["variant"], inp, o["chunk_size"])
    extra = peak.read()
    torch.save({"token_logps": stats.token_logps.detach().cpu(), "ref_token_logps": stats.ref_token_logps.cpu(),
                "token_kl": stats.token_kl.detach().cpu(), "loss": loss.detach().cpu(),
                "grad_hidden": inp["policy_hidden"].grad.cpu(), "grad_weight": inp["policy_weight"].grad.cpu()},
               o["out"])
    return {"peak_extra_mib": extra, "seconds": seconds, "method": peak.method}


def run(*, rows: int = 4, seq_len: int = 1024, vocab: int = 32000, hidden: int = 256, chunk_size: int = 1024,
        dtype: str = "float32", threads: int | None = None, seed: int = 0, device: str = "cpu") -> dict:
    """Measure both variants in fresh processes and compare them; returns the result dict (``ratios``: chunked /
    naive peak memory)."""
    from finegrain.bench.measure import run_worker

    if rows < 2 or rows % 2:
        raise ValueError("rows must be an even number >= 2 (pairs of chosen and rejected rows)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    settings = dict(rows=rows, seq_len=seq_len, vocab=vocab, hidden=hidden, chunk_size=chunk_size, dtype=dtype,
                    threads=threads, seed=seed, device=device)
    results, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = str(Path(tmp) / f"{variant}.pt")
            results[variant] = run_worker("finegrain.bench.tdpo_memory", {**settings, "variant": variant, "out": out})
            tensors[variant] = torch.load(out, weights_only=True)
    diffs = {}
    for key in ("token_logps", "ref_token_logps", "token_kl", "loss", "grad_hidden", "grad_weight"):
        a, b = tensors["chunked"][key].double(), tensors["naive"][key].double()
        diffs[key] = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    c, n = results["chunked"], results["naive"]
    return {
        "benchmark": "tdpo_memory", "settings": settings, "memory_method": c["method"],
        "ratios": {"chunked/naive_peak_memory": c["peak_extra_mib"] / n["peak_extra_mib"]},
        "meaning": {"chunked/naive_peak_memory": "peak extra memory of TDPO statistics + loss, forward + backward: "
                                                 "chunked from hidden states / full logits of both models"},
        "figures": {"chunked_peak_mib": {"value": c["peak_extra_mib"], "unit": "MiB"},
                    "naive_peak_mib": {"value": n["peak_extra_mib"], "unit": "MiB"},
                    "chunked_seconds": {"value": c["seconds"], "unit": "s", "note": "one run, separate process"},
                    "naive_seconds": {"value": n["seconds"], "unit": "s", "note": "one run, separate process"},
                    "worst_relative_difference": {"value": max(diffs.values()), "unit": ""}},
        "relative_differences": diffs,
    }


def _check_rows(kwargs: dict) -> dict:
    if kwargs["rows"] < 2 or kwargs["rows"] % 2:
        raise ValueError("--rows must be an even number >= 2 (pairs of chosen and rejected rows)")
    return kwargs


main = make_main(run, __doc__, adjust=_check_rows, choices={"dtype": sorted(DTYPES)},
                 help={"rows": "sequences N (chosen rows, then rejected rows; even)",
                       "seq_len": "response length T", "vocab": "vocabulary size V",
                       "hidden": "hidden size H", "chunk_size": "rows per chunk of the chunked variant"})

