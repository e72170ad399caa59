"""How the benchmarks measure: peak memory of a block of work, device synchronisation for timers, workers in fresh
processes, and a description of the machine.

Peak memory of a block:

* CPU: the process's resident-set high-water mark (``VmHWM``) is reset to the current resident size through
  ``/proc/self/clear_refs`` (Linux >= 4.0) before the block, and the peak extra memory is ``VmHWM - VmRSS`` read
  before it. It counts every page the process touched (allocator slack included), not only tensors. Where
  ``clear_refs`` cannot be written the high-water mark of the whole process (``ru_maxrss``) is used instead, an
  upper bound if anything earlier peaked higher; the result says which method was used.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated before the
  block (tensors only; the caching allocator's reserve is not counted).

Each variant of a memory benchmark runs in its own fresh process, so that memory freed by one variant and kept by
the allocator cannot hide the next one's peak.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

import torch

from finegrain.errors import ConfigError


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak extra memory of the work done between :meth:`start` and :meth:`read` on ``device``.

    ``read()`` may be called several times (e.g. after every optimizer step); each call returns the peak since
    ``start()`` in MiB. ``method`` names how it was measured.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.method = ""
        self.before_mib = 0.0

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before_mib = torch.cuda.memory_allocated(self.device) / 2**20
            self.method = "torch.cuda.max_memory_allocated minus the allocation before the block"
            return self
        rss = _status_kib("VmRSS")
        if rss is not None and _reset_rss_peak():
            self.method = "peak resident set size (VmHWM after clear_refs) minus VmRSS before the block"
            self.before_mib = rss / 1024
        else:
            self.method = "ru_maxrss of the process minus the resident size before the block (upper bound)"
            self.before_mib = (rss if rss is not None else 0) / 1024
        return self

    def read(self) -> float:
        """Peak extra MiB since :meth:`start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.before_mib
        hwm = _status_kib("VmHWM") if self.method.startswith("peak resident") else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return hwm / 1024 - self.before_mib


def clock(device: str | torch.device) -> tuple[float, float]:
    """``(wall-clock, process CPU)`` seconds now, once the device's queued work is done (so that a wall-clock timer
    measures it). On a shared machine a one-thread process's CPU time leaves out the time it waited for a core."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def timed(device: str | torch.device, fn, *args, **kwargs) -> tuple[float, float, object]:
    """``(wall-clock seconds, CPU seconds, fn(*args, **kwargs))``, the device synchronised before and after."""
    wall, cpu = clock(device)
    out = fn(*args, **kwargs)
    wall_end, cpu_end = clock(device)
    return wall_end - wall, cpu_end - cpu, out


def after_optimizer_step(callback):
    """Within this block, ``callback(*args)`` runs after every :func:`finegrain.trainers.loop.optimizer_step` (with
    the step's positional arguments, the loss last): how the benchmarks time and measure the trainers' steps."""
    from unittest import mock

    from finegrain.trainers import loop

    original = loop.optimizer_step

    def hooked(*args, **kwargs):
        out = original(*args, **kwargs)
        callback(*args)
        return out

    return mock.patch.object(loop, "optimizer_step", hooked)


def run_worker(module: str, options: dict, *, timeout: float | None = None) -> dict:
    """Run ``module.worker(options)`` in a fresh Python process (:func:`serve_worker`); return the JSON object of its
    last stdout line.

    The worker inherits this process's environment; a failure raises ``RuntimeError`` with the tail of its stderr.
    """
    cmd = [sys.executable, "-c", "import sys; from finegrain.bench.measure import serve_worker; serve_worker(*sys.argv[1:])",
           module, json.dumps(options)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{module} worker failed (exit {proc.returncode}):\n{tail}")
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{module} worker printed no result; stderr:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def serve_worker(module: str, options: str) -> None:
    """The worker side of :func:`run_worker`: print ``module.worker(options)`` (``options`` a JSON object) as one
    JSON line, with torch's thread count set to ``options["threads"]`` when given."""
    import importlib

    options = json.loads(options)
    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    print(json.dumps(importlib.import_module(module).worker(options)))


def resolve_device(device: str | None) -> str:
    """``"cuda"`` when asked for (a ConfigError when none is visible) or (``None``) when a CUDA device is visible,
    else ``"cpu"``."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    return device


def machine(device: str = "cpu") -> dict:
    """The machine a result was measured on (CPU, cores this process may use, torch threads, GPU name)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    out = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "usable_cores": usable,
        "torch_threads": torch.get_num_threads(), "device": device,
    }
    try:
        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    return out


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that the next ``Accelerator`` (ours or a ``transformers``
    ``Trainer``'s) is set up afresh with its own device and precision (accelerate refuses a change otherwise)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextlib.contextmanager
def use_device(device: str):
    """Within this block, trainers that place themselves through accelerate run on ``device``: ``"cpu"`` sets
    ``ACCELERATE_USE_CPU`` (a CUDA device may be visible), ``"cuda"`` leaves accelerate's choice. The variable is
    restored on exit."""
    saved = os.environ.get("ACCELERATE_USE_CPU")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = saved


def matmul_flops_per_s(m: int = 2048, k: int = 2048, n: int = 2048, *, repeats: int = 5, device: str = "cpu",
                       dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """The FLOP/s of a plain ``(m, k) @ (k, n)`` matrix product (``2 m k n`` FLOPs) on this machine with torch's
    current thread count: the best of ``repeats`` timed runs after one warm-up, by the wall clock and by the
    process's CPU time (on a shared machine a one-thread process's CPU time leaves out the time it waited for a
    core). The roofline of the real-model benchmark divides a training step's model FLOP/s by it."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    flops = 2.0 * m * k * n
    a @ b
    wall, cpu = map(list, zip(*(timed(device, torch.matmul, a, b)[:2] for _ in range(repeats))))
    return {"shape": [m, k, n], "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "flops_per_s": flops / min(wall), "cpu_flops_per_s": flops / max(min(cpu), 1e-9),
            "wall_s": wall, "cpu_s": cpu}
