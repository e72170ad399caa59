"""``finegrain bench``: run speed and memory benchmarks, print their ratios as one table, write one JSON per benchmark.

Why every figure is a ratio measured side by side in one run, and what each benchmark measures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import difflib
import importlib
import inspect
import io
import math
import shlex
import sys
import time
import types
import typing
from pathlib import Path

from finegrain.config import CommandParser
from finegrain.errors import ConfigError

# name -> (summary, issue); the module is finegrain.bench.NAME
BENCHMARKS: dict[str, tuple[str, str]] = {
    "po_vs_trl": ("step time of finegrain po (DPO, TDPO2, precomputed reference) vs TRL's DPOTrainer", "issue 3"),
    "tdpo_memory": ("peak memory of TDPO's chunked full-vocabulary KL vs full logits of both models", "issue 3"),
    "lora_memory": ("peak memory of DPO: LoRA with the adapter-disabled reference vs a reference copy", "issue 7"),
    "rollout_throughput": ("rollout tokens/s of finegrain's sampler vs transformers generate", "issue 5"),
    "rm_speed": ("sentence-RM forward + backward time vs the sequence RM on the same backbone", "issue 4"),
    "edit_labels": ("edit-label throughput vs the tokenization it needs", "issue 4"),
    "ppo_breakdown": ("a PPO step's time by phase (generate, score, train), sampler vs generate", "issue 5"),
    "smollm2": ("all of the above on SmolLM2-135M (or its architecture): DPO vs TRL (full, LoRA), TDPO2, "
                "TDPO memory, sampler, PPO phases, roofline", "issue 16"),
}

# Long quality runs (10+ minutes each on 2 cores): listed for reference, run as scripts.
QUALITY = {
    "po_quality": ("oracle reward, well-formed rate and KL of SFT, DPO, TDPO1/2, T-REG on the world (3 seeds)",
                   "OMP_NUM_THREADS=1 .venv/bin/python bench/po_quality.py --threads 1"),
    "rm_quality": ("pair accuracy and token-credit AUROC of the four reward models on the world (3 seeds)",
                   ".venv/bin/python bench/rm_quality.py"),
    "ppo_quality": ("PPO with sequence / sentence / token rewards at one sample budget on the world (3 seeds)",
                    ".venv/bin/python bench/ppo_quality.py"),
}


DESCRIPTION = ("Run speed and memory benchmarks; print their ratios, each measured side by side in one run, as one "
               "table; write one JSON result per benchmark.")


def _epilog() -> str:
    lines = ["benchmarks (default: all of them):"]
    lines += [f"  {name:<19} {summary} [{issue}]" for name, (summary, issue) in BENCHMARKS.items()]
    lines += ["", "quality benchmarks (10+ minutes each; not run by finegrain bench, run them as scripts):"]
    lines += [f"  {name:<19} {summary}\n  {'':<19} {cmd}" for name, (summary, cmd) in QUALITY.items()]
    lines += ["", "Results: OUT/NAME.json (NAME-cuda.json on CUDA); OUT defaults to bench/results, or bench/results/quick",
              "with --quick. The scripts under bench/ run the same code with every size as an option."]
    return "\n".join(lines)


class ScriptParser(argparse.ArgumentParser):
    """The parser of a benchmark script: every long option takes both spellings, ``--snake_case`` and
    ``--kebab-case``, as the ``finegrain`` commands do."""

    def add_argument(self, *flags: str, **kwargs: typing.Any) -> argparse.Action:  # type: ignore[override]
        spelled = []
        for f in flags:
            long = f.startswith("--")
            spelled += [f, "--" + f[2:].replace("_", "-"), "--" + f[2:].replace("-", "_")] if long else [f]
        return super().add_argument(*dict.fromkeys(spelled), **kwargs)  # the flag as given first: it names the dest


def make_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="finegrain bench", description=DESCRIPTION,
                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all; listed below)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, all benchmarks in about 1-2 minutes on 2 cores (a "
                   "smoke run: ratios at these sizes say little about real sizes)")
    p.add_argument("--out", default=None, help="directory for the JSON results (default: bench/results, or "
                   "bench/results/quick with --quick)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when a CUDA device is "
                   "visible (the GPU path: bf16, SDPA, a ~1B Llama, tokens/s and MFU), else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every benchmark (default: each "
                   "benchmark's own; on a shared 2-core machine 1 is steadier)")
    return p


def _selection(names: list[str]) -> list[str]:
    if not names:
        return list(BENCHMARKS)
    out = []
    for name in names:
        if name in QUALITY:
            raise ConfigError(f"'{name}' is a quality benchmark (10+ minutes); run it as a script: {QUALITY[name][1]}")
        if name not in BENCHMARKS:
            close = difflib.get_close_matches(name, list(BENCHMARKS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown benchmark '{name}'{hint} (choose from {', '.join(BENCHMARKS)})")
        if name not in out:
            out.append(name)
    return out


def benchmark_kwargs(module, *, quick: bool, device: str, threads: int | None) -> dict:
    """The keyword arguments ``finegrain bench`` passes to ``module.run``: the module's quick / GPU sizes, the
    device and the thread count where ``run`` takes them."""
    params = inspect.signature(module.run).parameters
    kwargs: dict = {}
    if device == "cuda":
        kwargs.update(getattr(module, "GPU_QUICK" if quick else "GPU", {}))
    elif quick:
        kwargs.update(getattr(module, "QUICK", {}))
    if "device" in params:
        kwargs["device"] = device
    if threads is not None and "threads" in params:
        kwargs["threads"] = threads
    return kwargs


def _command(name: str, args: argparse.Namespace, device: str) -> str:
    parts = ["finegrain", "bench", name] + (["--quick"] if args.quick else []) + ["--device", device]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


def _quiet_libraries() -> contextlib.ExitStack:
    """No download/progress bars from transformers and datasets while benchmarks run (restored when the returned
    context exits)."""
    import datasets
    from transformers.utils import logging as hf

    restore = contextlib.ExitStack()
    for enabled, disable, enable in ((hf.is_progress_bar_enabled, hf.disable_progress_bar, hf.enable_progress_bar),
                                     (datasets.is_progress_bar_enabled, datasets.disable_progress_bars,
                                      datasets.enable_progress_bars)):
        if enabled():
            disable()
            restore.callback(enable)
    return restore


def run_one(name: str, args: argparse.Namespace, device: str) -> dict:
    """Run one benchmark; its own output is captured. Returns its result, or ``{"benchmark", "error"}``."""
    import torch

    from finegrain import __version__
    from finegrain.bench.measure import machine

    module = importlib.import_module(f"finegrain.bench.{name}")
    kwargs = benchmark_kwargs(module, quick=args.quick, device=device, threads=args.threads)
    threads = torch.get_num_threads()
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), _quiet_libraries():
            result = module.run(**kwargs)
    except Exception as exc:  # one failing benchmark must not lose the others' results
        tail = "\n".join(log.getvalue().strip().splitlines()[-5:])
        result = {"benchmark": name, "error": f"{type(exc).__name__}: {exc}" + (f"\n{tail}" if tail else "")}
    finally:
        seconds = time.perf_counter() - start
        info = machine(device)
        torch.set_num_threads(threads)  # a benchmark's thread setting must not leak into the next one
    bad = {k: v for k, v in result.get("ratios", {}).items() if not (isinstance(v, float) and math.isfinite(v) and v > 0)}
    if bad:
        result.setdefault("notes", []).append(f"ratios that are not finite and positive: {bad}")
    return dict(result, command=_command(name, args, device), quick=args.quick, seconds=seconds, machine=info,
                finegrain=__version__, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                kwargs=kwargs)


def main(argv: list[str] | None = None) -> int:
    """``finegrain bench [names...] [--quick] [--out DIR] [--device cpu|cuda] [--threads N]``."""
    args = make_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    names = _selection(args.names)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    from finegrain.bench.measure import resolve_device
    from finegrain.bench.table import format_table, write_json

    device = resolve_device(args.device)
    out = Path(args.out) if args.out else Path("bench") / "results" / ("quick" if args.quick else "")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    print(f"finegrain bench: {len(names)} benchmark(s) on {device}{' (quick sizes)' if args.quick else ''}; "
          f"results in {out}/", file=sys.stderr, flush=True)
    results = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        result = run_one(name, args, device)
        path = write_json(result, out / (f"{name}.json" if device == "cpu" else f"{name}-{device}.json"))
        status = "failed: " + result["error"].splitlines()[0] if "error" in result else "done"
        print(f"[{i}/{len(names)}] {name} {status} in {result['seconds']:.1f} s -> {path}", file=sys.stderr, flush=True)
        results.append(result)
    print(format_table(results))
    return 1 if any("error" in r for r in results) else 0


def make_main(run, doc: str, *, help: dict[str, str] | None = None, choices: dict[str, tuple] | None = None,
              defaults: dict | None = None, skip: tuple[str, ...] = (), adjust=None,
              json_flags: tuple[str, ...] = ("--json",), json_default: str | None = None):
    """``main(argv=None) -> int`` of a benchmark module, which the scripts under ``bench/`` run: every size as
    an option (``doc``'s first paragraph is the description).

    One option per keyword of ``run`` but those in ``skip`` (``--kebab-name``, and ``--snake_name`` too), typed as
    ``run`` declares it (``--flag`` / ``--no-flag`` for booleans, several values for lists), with ``run``'s default
    unless ``defaults`` gives the command line another, ``help`` and ``choices`` where given (``--device``: cpu or
    cuda); ``--threads 0`` means None (the benchmark's own default). ``adjust(kwargs) -> kwargs`` converts the
    parsed options (a ``ValueError`` it raises is a usage error). Then the result is written, with the command line
    and the machine, to the file of ``json_flags`` when given, and its table is printed; the exit status is 0.
    """
    help = {"threads": "torch threads (0: torch's default)", **(help or {})}
    defaults, choices = defaults or {}, {"device": ("cpu", "cuda"), **(choices or {})}

    def main(argv: list[str] | None = None) -> int:
        from finegrain.bench.measure import machine
        from finegrain.bench.table import format_table, write_json

        argv = list(sys.argv[1:] if argv is None else argv)
        hints = typing.get_type_hints(run)
        p = ScriptParser(description=doc.split("\n\n")[0])
        for name, param in inspect.signature(run).parameters.items():
            if name in skip:
                continue
            tp = hints[name]
            if isinstance(tp, types.UnionType):  # X | None, or tuple[...] | list[...]
                tp = next(t for t in typing.get_args(tp) if t is not type(None))
            flags = [f"--{name.replace('_', '-')}"]
            default = defaults.get(name, param.default)
            spec = dict(help=help.get(name), choices=choices.get(name))
            if tp is bool:
                p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, **spec)
            elif typing.get_origin(tp) in (tuple, list):
                p.add_argument(*flags, nargs="*", type=typing.get_args(tp)[0], default=list(default), **spec)
            else:
                p.add_argument(*flags, type=tp, default=default, **spec)
        p.add_argument(*json_flags, dest="json", default=json_default, help="also write the result to this "
                       "JSON file (with the command line and the machine; '' for none; default: %(default)s)")
        kwargs = vars(p.parse_args(argv))
        json_path = kwargs.pop("json")
        if "threads" in kwargs:
            kwargs["threads"] = kwargs["threads"] or None
        if adjust is not None:
            try:
                kwargs = adjust(kwargs)
            except ValueError as exc:
                p.error(str(exc))
        result = run(**kwargs)
        if json_path:
            device = result.get("settings", {}).get("device", "cpu")
            result = dict(result, command=shlex.join(["python", *sys.argv]), machine=machine(device))
            print(f"wrote {write_json(result, json_path)}")
        print(format_table([result]))
        return 0

    return main
