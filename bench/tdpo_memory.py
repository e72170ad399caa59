"""Peak memory of TDPO's per-token statistics: chunked from hidden states vs full logits of both models.

Both variants compute, from final hidden states and output heads of a policy and a reference, the policy and
reference token log-probs and the forward token KL over the full vocabulary, then the TDPO2 loss and its
backward (gradients w.r.t. the policy's hidden states and head weight):

* ``chunked``: :func:`finegrain.ops.chunked.completion_stats` (masked rows only, ``chunk_size`` rows at a time,
  logits recomputed in backward);
* ``naive``: :func:`finegrain.ops.chunked.naive_completion_stats` (``(N, T, V)`` logits of both models, then
  ``log_softmax``; autograd keeps what it needs).

Each variant runs in a fresh Python process. After its inputs are allocated and a small warm-up has run, the
process resets its peak resident set size (``/proc/self/clear_refs``), runs forward + backward once, and reports
``VmHWM − VmRSS_before``: the peak extra memory of the computation on CPU. Where ``clear_refs`` cannot be written,
``ru_maxrss`` minus the resident size before the run is used (an upper bound if anything earlier peaked higher).
The parent process compares the two variants' values and gradients and prints the memory ratio.

Usage (defaults: B = 4 sequences of T = 1024 tokens, V = 32000, H = 256, float32):

    .venv/bin/python bench/tdpo_memory.py
    .venv/bin/python bench/tdpo_memory.py --rows 4 --seq-len 256 --vocab 8000   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch

from finegrain.losses import tdpo_loss
from finegrain.ops import masked_sum
from finegrain.ops.chunked import completion_stats, naive_completion_stats

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _inputs(args, device="cpu"):
    """Policy and reference states/heads; the reference is a perturbed copy so the KL is not trivially 0."""
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(args.seed)
    n, t, h, v = args.rows, args.seq_len, args.hidden, args.vocab

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32).mul_(scale).to(dtype)

    policy_hidden = rnd(n, t, h)
    policy_weight = rnd(v, h, scale=2.0 / h**0.5)
    ref_hidden = policy_hidden + rnd(n, t, h, scale=0.3)
    ref_weight = policy_weight + rnd(v, h, scale=0.3 / h**0.5)
    labels = torch.randint(0, v, (n, t), generator=g)
    # Ragged responses: row i has t - i * t // 8 tokens, right-padded.
    lengths = torch.tensor([max(1, t - i * t // 8) for i in range(n)])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return dict(
        policy_hidden=policy_hidden.requires_grad_(True), policy_weight=policy_weight.requires_grad_(True),
        ref_hidden=ref_hidden, ref_weight=ref_weight, labels=labels, mask=mask,
    )


def _step(fn, inp, chunk_size):
    stats = fn(inp["policy_hidden"], inp["policy_weight"], inp["labels"], inp["mask"],
               ref_hidden=inp["ref_hidden"], ref_weight=inp["ref_weight"], compute_kl=True, chunk_size=chunk_size)
    mask = inp["mask"]
    margin = masked_sum(stats.token_logps - stats.ref_token_logps, mask, dim=-1)
    seq_kl = masked_sum(stats.token_kl, mask, dim=-1)
    b = margin.shape[0] // 2  # chosen rows first, then rejected rows
    loss = tdpo_loss(margin[:b], margin[b:], seq_kl[:b], seq_kl[b:], beta=0.1, alpha=0.5, variant="tdpo2").losses.mean()
    loss.backward()
    return stats, loss


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    fn = completion_stats if args.worker == "chunked" else naive_completion_stats
    # Warm-up on tiny shapes so one-off library buffers are not counted.
    small = argparse.Namespace(**{**vars(args), "rows": 2, "seq_len": 4, "vocab": 16})
    _step(fn, _inputs(small), args.chunk_size)
    inp = _inputs(args)
    before = _proc_status_kib("VmRSS")
    exact = _reset_peak()
    start = time.perf_counter()
    stats, loss = _step(fn, inp, args.chunk_size)
    seconds = time.perf_counter() - start
    peak = _proc_status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(
        {
            "token_logps": stats.token_logps.detach(), "ref_token_logps": stats.ref_token_logps,
            "token_kl": stats.token_kl.detach(), "loss": loss.detach(),
            "grad_hidden": inp["policy_hidden"].grad, "grad_weight": inp["policy_weight"].grad,
        },
        args.out,
    )
    print(json.dumps({"peak_extra_mib": (peak - before) / 1024, "seconds": seconds, "exact_peak": exact}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4, help="sequences N (chosen rows, then rejected rows; even)")
    parser.add_argument("--seq-len", type=int, default=1024, help="response length T")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of the chunked variant")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows < 2 or args.rows % 2:
        parser.error("--rows must be an even number >= 2 (pairs of chosen and rejected rows)")
    if args.worker:
        worker(args)
        return

    print(f"TDPO statistics + loss, forward+backward: N={args.rows} sequences, T={args.seq_len}, V={args.vocab}, "
          f"H={args.hidden}, {args.dtype}, chunk_size={args.chunk_size}, threads={args.threads}")
    results, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("chunked", "naive"):
            out = os.path.join(tmp, f"{variant}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--out", out]
            for key in ("rows", "seq_len", "vocab", "hidden", "chunk_size", "dtype", "threads", "seed"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            tensors[variant] = torch.load(out)
            r = results[variant]
            print(f"  {variant:8s} peak extra memory {r['peak_extra_mib']:9.1f} MiB   time {r['seconds']:6.2f} s"
                  + ("" if r["exact_peak"] else "   (ru_maxrss fallback)"))

    ratio = results["chunked"]["peak_extra_mib"] / results["naive"]["peak_extra_mib"]
    print(f"  ratio chunked / naive = {ratio:.3f}")
    tol = 1e-4 if args.dtype != "bfloat16" else 5e-2
    worst = 0.0
    for key in ("token_logps", "ref_token_logps", "token_kl", "loss", "grad_hidden", "grad_weight"):
        a, b = tensors["chunked"][key].double(), tensors["naive"][key].double()
        diff = (a - b).abs().max().item()
        rel = diff / max(b.abs().max().item(), 1e-30)
        worst = max(worst, rel)
        print(f"  max |chunked - naive| {key:16s} {diff:.3e}  (relative to max |naive| {rel:.1e})")
        torch.testing.assert_close(a, b, atol=tol * max(b.abs().max().item(), 1.0), rtol=tol)
    print(f"  values and gradients agree (worst relative difference {worst:.1e})")


if __name__ == "__main__":
    main()
