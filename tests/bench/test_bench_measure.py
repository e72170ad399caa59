"""Peak-memory measurement, fresh-process workers, the device switch and the result table."""

from __future__ import annotations

import os

import pytest
import torch

from finegrain.bench.measure import PeakMemory, resolve_device, run_worker, use_device
from finegrain.bench.table import format_table


def test_cpu_peak_sees_a_tensor_allocated_and_freed_inside_the_block():
    peak = PeakMemory("cpu").start()
    x = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    del x
    extra = peak.read()
    assert extra >= 60, (extra, peak.method)
    if peak.method.startswith("peak resident"):  # exact high-water mark (Linux clear_refs)
        assert extra < 64 + 64, extra


def test_worker_failure_raises_with_its_stderr():
    with pytest.raises(RuntimeError, match="KeyError"):
        run_worker("finegrain.bench.tdpo_memory", {"variant": "chunked"}, timeout=120)


def test_use_device_restores_the_environment(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with use_device("cpu"):
        assert os.environ["ACCELERATE_USE_CPU"] == "true"
    assert "ACCELERATE_USE_CPU" not in os.environ
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    with use_device("cuda"):
        assert os.environ["ACCELERATE_USE_CPU"] == "false"
    assert os.environ["ACCELERATE_USE_CPU"] == "false"


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_table_lists_ratios_figures_errors_and_notes():
    ok = {"benchmark": "a", "ratios": {"x/y": 0.5}, "meaning": {"x/y": "x over y"},
          "figures": {"x_ms": {"value": 12.345, "unit": "ms"}, "share": {"value": 0.25, "unit": "%"}},
          "notes": ["measured twice"]}
    text = format_table([ok, {"benchmark": "b", "error": "RuntimeError: boom\nmore"}])
    assert "* x/y" in text and "0.500" in text and "x over y" in text
    assert "12.3 ms" in text and "25.0 %" in text
    assert "error" in text and "RuntimeError: boom" in text and "more" not in text
    assert "a: measured twice" in text
