"""What a training step spends its time on: a ``torch.profiler`` trace of one step, summarised by kind of work.

:func:`step_profiler` returns a CPU profiler (``record_shapes`` and ``with_flops`` on, so that the matmuls carry
their FLOP counts) whose schedule records exactly one step after ``skip`` steps: the caller calls ``prof.step()``
after every optimizer step. :func:`summarize` groups the recorded operators' *self* time (the time in an operator,
not in the operators it calls) into

* ``matmul``: dense matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ...), with the FLOP/s they ran at
  (the profiler's FLOP count of those operators over their self time);
* ``attention``: the fused scaled-dot-product attention kernels, forward and backward;
* ``optimizer``: everything inside ``Optimizer.step`` (torch records it as one range; inclusive time);
* ``other``: the rest -- element-wise operators, softmax and log-softmax, copies, reductions, indexing,
  the Python between operators is not an operator and shows as the gap to the step's wall-clock time,

and lists the top operators by self time. Categories are shares of the profiled self time; the profiler's own
overhead inflates the step a little, so the wall-clock step time of the unprofiled runs is what ratios use.
"""

from __future__ import annotations

MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation",
                        "aten::addmv", "aten::mv", "aten::dot", "aten::addmm_"})


def step_profiler(skip: int = 1):
    """A started-on-enter CPU profiler that records the step after ``skip`` steps (call ``.step()`` after each)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    return profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True,
                   schedule=schedule(wait=max(0, skip - 1), warmup=min(1, skip), active=1, repeat=1))


def _is_attention(name: str) -> bool:
    return "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name


def summarize(prof, top: int = 12) -> dict:
    """Shares of the profiled step's operator self time by kind of work, the matmuls' FLOP/s, and the top
    operators (see the module docstring). Times are in seconds."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
    matmul_flops = sum((e.flops or 0) for e in events if e.key in MATMUL_OPS)
    attention = sum(e.self_cpu_time_total for e in events if _is_attention(e.key)) / 1e6
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step#")) / 1e6
    seconds = {"matmul": matmul, "attention": attention, "optimizer": optimizer,
               "other": max(0.0, total - matmul - attention - optimizer)}
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "profiled_self_s": total, "seconds": seconds,
        "share": {k: v / total if total else 0.0 for k, v in seconds.items()},
        "matmul_flops": float(matmul_flops),
        "matmul_flops_per_s": matmul_flops / matmul if matmul else None,
        "top_ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                     "share": e.self_cpu_time_total / 1e6 / total if total else 0.0} for e in ops],
    }
