"""``finegrain bench``: a quick smoke run, argument errors, --help, and the sizes it passes to each benchmark."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from finegrain.bench import cli
from finegrain.cli.main import main as finegrain_main


def _ratios_ok(result: dict) -> None:
    assert result["ratios"], result
    for name, value in result["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
        assert result["meaning"][name]
    for name, fig in result["figures"].items():
        assert math.isfinite(fig["value"]), name


@pytest.mark.smoke
def test_quick_run_writes_finite_positive_ratios(tmp_path, capsys):
    threads = torch.get_num_threads()
    rc = finegrain_main(["bench", "rollout_throughput", "edit_labels", "--quick", "--out", str(tmp_path),
                         "--threads", "1", "--device", "cpu"])
    assert rc == 0
    assert torch.get_num_threads() == threads  # a benchmark's thread setting does not leak
    out = capsys.readouterr().out
    for name in ("rollout_throughput", "edit_labels"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["benchmark"] == name and result["quick"] is True
        _ratios_ok(result)
        assert result["command"] == f"finegrain bench {name} --quick --device cpu --threads 1"
        assert result["machine"]["device"] == "cpu" and result["seconds"] > 0
        for ratio in result["ratios"]:
            assert ratio in out  # the table shows every ratio
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit_labels.json", "rollout_throughput.json"]


@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown benchmark 'nope'"),
    (["po_vs_tlr"], "did you mean 'po_vs_trl'"),
    (["po_quality"], "bench/po_quality.py"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_argument_errors(argv, message, capsys):
    assert finegrain_main(["bench", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, no traceback


def test_out_must_be_a_directory(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    assert finegrain_main(["bench", "edit_labels", "--out", str(f)]) == 1
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_device(capsys):
    assert finegrain_main(["bench", "edit_labels", "--device", "cuda"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_help_lists_every_benchmark_and_the_quality_scripts(capsys):
    with pytest.raises(SystemExit) as exc:
        finegrain_main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in list(cli.BENCHMARKS) + list(cli.QUALITY):
        assert f"  {name} " in out
    for _, command in cli.QUALITY.values():
        assert command in out


@pytest.mark.parametrize("name", list(cli.BENCHMARKS))
def test_suite_sizes_are_arguments_of_run(name):
    """QUICK / GPU / GPU_QUICK of every module are keywords its run() takes (the GPU path cannot run here, so this
    catches a misspelt size before a GPU machine does); device and threads are passed where run() takes them."""
    module = importlib.import_module(f"finegrain.bench.{name}")
    params = inspect.signature(module.run).parameters
    for attr in ("QUICK", "GPU", "GPU_QUICK"):
        unknown = set(getattr(module, attr)) - set(params)
        assert not unknown, f"{name}.{attr}: {unknown}"
    for quick in (False, True):
        for device in ("cpu", "cuda"):
            kwargs = cli.benchmark_kwargs(module, quick=quick, device=device, threads=2)
            inspect.signature(module.run).bind(**kwargs)
            assert kwargs.get("threads") == 2
            assert kwargs.get("device", device) == device
    assert cli.benchmark_kwargs(module, quick=False, device="cpu", threads=None).get("threads") is None
    assert module.__doc__ and "finegrain bench" in module.__doc__


def test_gpu_sizes_use_the_1b_llama_in_bf16():
    from finegrain.bench import lora_memory, po_vs_trl, rollout_throughput
    from finegrain.bench.synthetic import LLAMA_1B

    for module in (po_vs_trl, lora_memory, rollout_throughput):
        for attr in ("GPU", "GPU_QUICK"):
            sizes = getattr(module, attr)
            assert {k: sizes[k] for k in LLAMA_1B.as_dict()} == LLAMA_1B.as_dict()
            assert sizes.get("bf16") or sizes.get("dtype") == "bfloat16"


@pytest.mark.parametrize("name", list(cli.BENCHMARKS))
def test_scripts_under_bench_run_the_package(name):
    """bench/NAME.py stays a working command: its --help comes from the package's main()."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "bench", f"{name}.py")
    with open(script) as f:
        assert f"from finegrain.bench.{name} import main" in f.read()


@pytest.mark.slow
def test_every_benchmark_quick(tmp_path):
    """The whole suite at quick sizes, through the installed command (about a minute on 2 cores)."""
    proc = subprocess.run([sys.executable, "-m", "finegrain", "bench", "--quick", "--threads", "1", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in cli.BENCHMARKS:
        _ratios_ok(json.loads((tmp_path / f"{name}.json").read_text()))
    lora = json.loads((tmp_path / "lora_memory.json").read_text())
    assert lora["figures"]["lora_loss_difference"]["value"] < 1e-5  # both LoRA references compute the same loss
    tdpo = json.loads((tmp_path / "tdpo_memory.json").read_text())
    assert tdpo["figures"]["worst_relative_difference"]["value"] < 1e-4  # chunked == naive


def test_benchmarks_doc_covers_every_benchmark():
    """docs/benchmarks.md has a section and a command for every benchmark, and names no benchmark that is gone."""
    import re

    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "benchmarks.md")).read()
    for name in cli.BENCHMARKS:
        assert f"## {name}" in doc and f"finegrain bench {name}" in doc, name
    named = set(re.findall(r"finegrain bench ([a-z_0-9]+)", doc))
    assert named <= set(cli.BENCHMARKS), named - set(cli.BENCHMARKS)
    for script in set(re.findall(r"bench/([a-z_]+)\.py", doc)):
        assert os.path.exists(os.path.join(os.path.dirname(__file__), "..", "..", "bench", f"{script}.py")), script


def test_script_parser_takes_both_spellings_of_every_long_option():
    p = cli.ScriptParser(prog="x")
    p.add_argument("--world-dir", default=None)
    p.add_argument("--work_dir", default=None)
    p.add_argument("-q", "--reuse-rms", action="store_true")
    for argv in (["--world-dir", "w", "--work_dir", "k", "-q"], ["--world_dir", "w", "--work-dir", "k", "--reuse_rms"]):
        assert vars(p.parse_args(argv)) == {"world_dir": "w", "work_dir": "k", "reuse_rms": True}
    assert vars(p.parse_args([])) == {"world_dir": None, "work_dir": None, "reuse_rms": False}


@pytest.mark.parametrize("script", ["po_quality", "ppo_quality", "rm_quality"])
def test_quality_scripts_take_both_spellings(script):
    """The bench/ quality scripts parse --world-dir and --world_dir alike (their --help lists both)."""
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "bench", f"{script}.py")
    out = subprocess.run([sys.executable, bench, "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--world-dir" in out.stdout and "--world_dir" in out.stdout
