"""``finegrain ifeval run``: every method on the real model, from nothing to a results table and an HTML report.

One command, offline (docs/ifeval.md, "Every method on the real model"). Stages, in order, each skipped when its
output exists, so an interrupted run is resumed by running the same command again:

1. ``task``: the task (``finegrain ifeval build``: model, prompts, samples, pairs, revisions, edit labels, the start
   model's evaluation, token truth);
2. one run directory per method under ``RUN_DIR``, each a normal ``finegrain`` command on the converted model and
   the task's data (LoRA, ``--use_peft``; the command's own run directory, checkpoints and ``final/``): the methods
   of :data:`METHODS` -- ``finegrain po`` with :data:`PO_METHODS`' flags, ``finegrain rm --level LEVEL``,
   ``finegrain ppo`` with :data:`PPO_REWARDS` or each reward model (``ppo-rm-LEVEL``); docs/ifeval.md's table gives
   each run's command, paper and data. A run with a checkpoint is resumed (``--resume_from_checkpoint latest``); a
   run directory without one is started afresh.
3. ``eval``: every trained policy and the start model on the held-out test prompts, greedy
   (:func:`finegrain.ifeval.evaluate.evaluate_on_task`: ``finegrain eval --judge ifeval`` plus IFEval's pooled
   accuracies, KL to the start model), into each run directory's ``eval.json``; the start model's responses are
   sampled once for all of them;
4. ``credit``: ``finegrain eval --token_credit`` of contrastive prompting, the implicit rewards of the DPO-family
   policies, every reward model and ``ifeval:credit`` against the exact token truth, into
   ``RUN_DIR/token-credit``;
5. ``report``: ``finegrain report`` of every run directory into ``RUN_DIR/report.html``, and the results table
   ``RUN_DIR/results.md`` (+ ``results.json``).

The ``eval``, ``credit`` and ``report`` stages cover every finished method in ``RUN_DIR``, also those a
``--methods`` run did not select, so running a few more methods later completes the same table.

Settings are presets (:data:`PRESETS`): ``full`` (the task as built by ``finegrain ifeval build``, every method
trained for its budget) and ``quick`` (a small task of its own and a few steps per method: the whole pipeline in
minutes, a smoke test whose numbers mean little). ``RUN_DIR/settings.json`` records the preset and each method's
flags; a second run with another preset, or with other flags for a method already there, in the same directory is
refused (a method new to the directory is added). Every heavy step runs one at a time, with ``--threads`` torch
threads per process (1 on a shared machine). Wall times go to ``RUN_DIR/times.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from finegrain.config import check_ranges, option, parse
from finegrain.data.files import write_text
from finegrain.errors import ConfigError

__all__ = ["METHODS", "PRESETS", "RunConfig", "main", "plan", "run"]

RM_LEVELS = ("sequence", "sentence", "token", "discriminator")
CONTRASTIVE = ["--contrastive_template", "draft",
               "--contrastive_positive", "a better answer that follows every instruction of the request exactly",
               "--contrastive_negative", "a worse answer that ignores the instructions of the request"]
"""T-REG's contrastive prompting in the paper's revision form (a request to rewrite the response into a better /
worse answer), with goals that name this task's quality: following the request's instructions."""
PO_METHODS = {"dpo": ["--loss", "dpo"], "tdpo2": ["--loss", "tdpo2"], "treg": ["--loss", "treg-dpo", *CONTRASTIVE],
              "dpo-rev": ["--loss", "dpo"], "tdpo2-rev": ["--loss", "tdpo2"],
              "dpo-rev-sft": ["--loss", "dpo", "--rpo_alpha", "1.0", "--num_train_epochs", "3"]}
"""Each preference method's flags; they come after the setting's ``po`` flags, so a method may override them
(``dpo-rev-sft`` trains 3 epochs where the full setting trains 1)."""
PO_DATA = {"dpo-rev": "revision_pairs.jsonl", "tdpo2-rev": "revision_pairs.jsonl",
           "dpo-rev-sft": "revision_pairs.jsonl"}
"""Preference data of a method other than the on-policy pairs (data/pairs.jsonl)."""
PPO_REWARDS = {"ppo-pass": "ifeval:pass", "ppo-credit": "ifeval:credit"}
METHODS: tuple[str, ...] = (*PO_METHODS, *(f"rm-{lv}" for lv in RM_LEVELS), *PPO_REWARDS,
                            *(f"ppo-rm-{lv}" for lv in RM_LEVELS))
"""Every method, in the order the stages run."""

_COMMON = ["--use_peft", "--lora_r", "16", "--lora_alpha", "32", "--bf16", "--disable_tqdm", "--logging_steps", "1"]

PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "task": [],  # the task as `finegrain ifeval build` makes it by default
        "task_dir": None,
        "train": [*_COMMON, "--max_length", "288", "--max_prompt_length", "112", "--save_steps", "5"],
        "po": ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--num_train_epochs", "1",
               "--learning_rate", "1e-4", "--beta", "0.1"],
        "rm": ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--num_train_epochs", "1",
               "--learning_rate", "1e-4"],
        "ppo": ["--estimator", "gae", "--critic", "shared", "--rollout_batch_size", "16", "--ppo_epochs", "2",
                "--num_mini_batches", "2", "--per_device_train_batch_size", "8", "--max_new_tokens", "64",
                "--max_steps", "16", "--learning_rate", "5e-5", "--critic_learning_rate", "5e-4", "--kl_coef", "0.05", "--judge", "ifeval",
                "--save_steps", "2"],
        "eval_prompts": None,  # all test prompts
        "eval_max_new_tokens": 160,
        "credit_rows": 64,
    },
    "quick": {
        "task": ["--num_train_prompts", "32", "--num_test_prompts", "16", "--num_samples", "2", "--max_new_tokens",
                 "40", "--batch_size", "32"],
        "task_dir": "ifeval-quick",
        "train": [*_COMMON, "--max_length", "160", "--max_prompt_length", "112"],
        "po": ["--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "5e-5"],
        "rm": ["--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-4"],
        "ppo": ["--estimator", "gae", "--critic", "shared", "--rollout_batch_size", "4", "--ppo_epochs", "1",
                "--num_mini_batches", "1", "--per_device_train_batch_size", "4", "--max_new_tokens", "24",
                "--max_steps", "1", "--learning_rate", "1e-4", "--judge", "ifeval"],
        "eval_prompts": 16,
        "eval_max_new_tokens": 40,
        "credit_rows": 8,
    },
}
"""The two settings: flags per command family (``train`` goes to every training command), the task's build options
and directory (under the cache; None: the default task), and the evaluation's size."""


@dataclasses.dataclass
class RunConfig:
    """Every method on the real model: the results table and the HTML report (docs/ifeval.md)."""

    run_dir: str | None = option(None, "where the run directories, results and report go; default: runs/ifeval (runs/ifeval-quick with --quick)")
    quick: bool = option(False, "the quick setting: a small task of its own and a few steps per method (minutes; a smoke test)")
    methods: list[str] = option(default_factory=list, help="run only these methods (default: all; their dependencies too): " + ", ".join(METHODS))
    seeds: list[int] = option(default_factory=lambda: [0], help="training seeds; the first seed's run directory is RUN_DIR/METHOD, others RUN_DIR/METHOD-seedS")
    stages: list[str] = option(default_factory=list, help="run only these stages (task, train, eval, credit, report); default: all")
    cache_dir: str | None = option(None, "cache root (model, task); default: $FINEGRAIN_CACHE, else $FINEGRAIN_HOME, else ~/.cache/finegrain")
    threads: int = option(1, "torch threads per process (1 on a machine shared with other jobs)")
    device: str | None = option(None, "cpu, cuda, ...; default: cuda when available")
    dry_run: bool = option(False, "print the commands and what would be skipped, run nothing")

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; the methods are {', '.join(METHODS)}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"unknown stage(s) {', '.join(bad)}; the stages are {', '.join(STAGES)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        check_ranges(self, positive=("threads",))

    @property
    def setting(self) -> str:
        """``quick`` or ``full``: the name of the preset."""
        return "quick" if self.quick else "full"

    @property
    def preset(self) -> dict[str, Any]:
        """The setting's flags and sizes (:data:`PRESETS`)."""
        return PRESETS[self.setting]


STAGES = ("task", "train", "eval", "credit", "report")


# ------------------------------------------------------------------------------------------------ planning


@dataclasses.dataclass
class Paths:
    """Where everything of one run lives."""

    root: Path
    task: Path
    model: Path

    def method(self, name: str, seed: int, first_seed: int) -> Path:
        return self.root / (name if seed == first_seed else f"{name}-seed{seed}")


def _paths(cfg: RunConfig) -> Paths:
    from finegrain.ifeval.model import cache_home, model_dir

    root = Path(cfg.run_dir or ("runs/ifeval-quick" if cfg.quick else "runs/ifeval")).expanduser()
    task = cache_home(cfg.cache_dir) / (cfg.preset["task_dir"] or "ifeval")
    return Paths(root, task, model_dir(cfg.cache_dir))


def _selected(cfg: RunConfig) -> list[str]:
    """The asked methods plus the reward models their PPO runs need, in :data:`METHODS` order."""
    wanted = set(cfg.methods or METHODS)
    wanted |= {m.removeprefix("ppo-") for m in wanted if m.startswith("ppo-rm-")}
    return [m for m in METHODS if m in wanted]


def command_for(method: str, seed: int, out: Path, paths: Paths, preset: dict, rm_dirs: dict[str, Path]) -> list[str]:
    """The ``finegrain`` argv that trains ``method`` into ``out``."""
    data = paths.task / "data"
    base = ["--model_name_or_path", str(paths.model), "--output_dir", str(out), "--seed", str(seed), *preset["train"]]
    if method in PO_METHODS:
        pairs = data / PO_DATA.get(method, "pairs.jsonl")
        return ["po", "--dataset_name", str(pairs), *base, *preset["po"], *PO_METHODS[method]]
    if method.startswith("rm-"):
        level = method.removeprefix("rm-")
        dataset = data / ("revisions.jsonl" if level in ("token", "discriminator") else "pairs.jsonl")
        return ["rm", "--level", level, "--dataset_name", str(dataset), *base, *preset["rm"]]
    reward = PPO_REWARDS.get(method) or str(rm_dirs[method.removeprefix("ppo-")] / "final")
    return ["ppo", "--reward", reward, "--dataset_name", str(paths.task / "prompts" / "train.jsonl"), *base,
            *preset["ppo"]]


def _is_done(run: Path) -> bool:
    try:
        status = json.loads((run / "run.json").read_text()).get("status")
    except (OSError, ValueError):
        return False
    return status == "completed" and (run / "final").is_dir()


def _resume_flags(run: Path) -> list[str]:
    if any((run / "checkpoints").glob("step-*")):
        return ["--resume_from_checkpoint", "latest"]
    return ["--overwrite_output_dir"] if run.exists() else []


@dataclasses.dataclass
class Job:
    """One training command of the plan."""

    method: str
    seed: int
    out: Path
    argv: list[str]


def plan(cfg: RunConfig) -> tuple[Paths, list[Job]]:
    """The paths and the training jobs of ``cfg`` (every selected method for every seed)."""
    paths = _paths(cfg)
    jobs = []
    for seed in cfg.seeds:
        rm_dirs = {f"rm-{lv}": paths.method(f"rm-{lv}", seed, cfg.seeds[0]) for lv in RM_LEVELS}
        for method in _selected(cfg):
            out = paths.method(method, seed, cfg.seeds[0])
            jobs.append(Job(method, seed, out, command_for(method, seed, out, paths, cfg.preset, rm_dirs)))
    return paths, jobs


# ------------------------------------------------------------------------------------------------ running


class Clock:
    """Wall times of the stages in ``RUN_DIR/times.json`` (a skipped stage keeps its earlier time)."""

    def __init__(self, path: Path):
        self.path = path
        self.times: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, name: str, seconds: float) -> None:
        # what another `ifeval run` on the same directory recorded since is kept
        on_disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.times = {**self.times, **on_disk, name: round(seconds, 1)}
        write_text(self.path, json.dumps(self.times, indent=1) + "\n")


def finegrain(argv: list[str], log: Path, threads: int) -> float:
    """Run ``finegrain ARGV`` (this Python's) with its output in ``log``; returns the wall time.

    Raises:
        ConfigError: the command failed (the end of its log in the message).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as sink:
        sink.write(f"\n$ finegrain {' '.join(argv)}\n")
        sink.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([sys.executable, "-m", "finegrain", *argv], stdout=sink, stderr=subprocess.STDOUT,
                              env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-1500:]
        raise ConfigError(f"`finegrain {argv[0]}` failed (exit {done.returncode}); its log {log} ends with:\n{tail}")
    return seconds


def check_settings(paths: Paths, cfg: RunConfig) -> None:
    """Record the preset in ``RUN_DIR/settings.json``; refuse a directory made with other settings."""
    settings = {"setting": cfg.setting, "preset": cfg.preset, "task_dir": str(paths.task),
                "model": str(paths.model), "methods": {"po": PO_METHODS, "po_data": PO_DATA, "ppo": PPO_REWARDS}}
    target = paths.root / "settings.json"
    if target.is_file():
        old = json.loads(target.read_text())
        differ = sorted(k for k in settings if k != "methods" and old.get(k) != settings[k])
        old_methods = old.get("methods") or {}
        differ += sorted(f"{name}'s flags" for family, now in settings["methods"].items()
                         for name, flags in now.items() if name in old_methods.get(family, {})
                         and old_methods[family][name] != flags)
        if differ:
            raise ConfigError(f"{paths.root} holds runs made with other settings ({', '.join(differ)} differ: "
                              f"{old.get('setting')} there, {settings['setting']} now); use another --run_dir, or "
                              "delete that directory")
        settings["methods"] = {family: {**old_methods.get(family, {}), **now}
                               for family, now in settings["methods"].items()}
        if settings == old:
            return
    write_text(target, json.dumps(settings, indent=1) + "\n")


def stage_task(cfg: RunConfig, paths: Paths, clock: Clock) -> None:
    argv = ["ifeval", "build", "--task_dir", str(paths.task), "--threads", str(cfg.threads), "--disable_tqdm",
            *(["--cache_dir", cfg.cache_dir] if cfg.cache_dir else []),
            *(["--device", cfg.device] if cfg.device else []), *cfg.preset["task"]]
    built = [paths.task / "data" / "truth_test.jsonl", paths.task / "data" / "revision_pairs.jsonl",
             paths.task / "eval" / "start" / "eval.json"]
    if all(p.is_file() for p in built):
        print(f"[task] {paths.task} is built: skipped", flush=True)
        return
    print(f"[task] finegrain {' '.join(argv)}", flush=True)
    if not cfg.dry_run:
        clock.record("task", finegrain(argv, paths.root / "logs" / "task.log", cfg.threads))


def stage_train(cfg: RunConfig, paths: Paths, jobs: list[Job], clock: Clock) -> None:
    for job in jobs:
        name = job.out.name
        if _is_done(job.out):
            print(f"[train] {name}: done, skipped", flush=True)
            continue
        flags = _resume_flags(job.out)
        resumed = flags[:1] == ["--resume_from_checkpoint"]
        argv = [*job.argv, *flags]
        print(f"[train] {name}: finegrain {' '.join(argv)}", flush=True)
        if cfg.dry_run:
            continue
        seconds = finegrain(argv, paths.root / "logs" / f"{name}.log", cfg.threads)
        clock.record(name, (clock.times.get(name, 0.0) if resumed else 0.0) + seconds)
        print(f"[train] {name}: {seconds:.0f} s", flush=True)


def stage_eval(cfg: RunConfig, paths: Paths, jobs: list[Job], clock: Clock) -> None:
    import torch

    from finegrain.ifeval.data import load_rows_checked
    from finegrain.ifeval.evaluate import IFEVAL_KEYS, check_eval_settings, evaluate_on_task, rescore
    from finegrain.models.loading import ModelCache, resolve_device

    preset = cfg.preset
    if cfg.dry_run and not (paths.task / "task.json").is_file():
        print(f"[eval] the start model and every trained policy on the test prompts of {paths.task}", flush=True)
        return
    task_cfg = json.loads((paths.task / "task.json").read_text())
    dtype = task_cfg.get("dtype", "float32")
    rows = load_rows_checked(paths.task / "prompts" / "test.jsonl", "prompts")[: preset["eval_prompts"]]
    asked = {"n": len(rows), "max_new_tokens": preset["eval_max_new_tokens"], "dtype": dtype}
    targets = [("start", paths.model, paths.root / "start")] + [
        (j.out.name, j.out / "final", j.out) for j in jobs if not j.method.startswith("rm-") and _is_done(j.out)]
    torch.set_num_threads(cfg.threads)
    reference_samples: dict = {}  # the start model's responses, sampled once for every policy
    for name, policy, out in targets:
        if (out / "eval.json").is_file() and "prompt_strict" in json.loads((out / "eval.json").read_text()):
            done = check_eval_settings(out / "eval.json", asked)
            if not cfg.dry_run and any(k not in done for k in IFEVAL_KEYS):  # made before a key existed: re-score
                rescore(out, rows)
            print(f"[eval] {name}: done, skipped", flush=True)
            continue
        print(f"[eval] {name}: {len(rows)} test prompts, greedy, {dtype}", flush=True)
        if cfg.dry_run:
            continue
        models = ModelCache(resolve_device(cfg.device), dtype=dtype)  # one policy in memory at a time
        models.reference_samples = reference_samples
        start = time.perf_counter()
        evaluate_on_task(policy, rows, paths.task / "prompts" / "test.jsonl", out, reference=paths.model,
                         max_new_tokens=preset["eval_max_new_tokens"], dtype=dtype, device=cfg.device, models=models)
        clock.record(f"eval/{name}", time.perf_counter() - start)


def credit_sources(jobs: list[Job]) -> list[str]:
    """The ``NAME=SPEC`` sources of the token-credit stage for the finished runs of the first seed."""
    first = {j.method: j for j in jobs if j.seed == jobs[0].seed}
    specs = ["exact_truth=oracle-credit", "ifeval_credit=ifeval:credit", "contrastive=contrastive"]
    for method in PO_METHODS:
        if method in first and _is_done(first[method].out):
            specs.append(f"implicit_{method.replace('-', '_')}=implicit:{first[method].out / 'final'}")
    for level in RM_LEVELS:
        job = first.get(f"rm-{level}")
        if job and _is_done(job.out):
            specs.append(f"{level}_rm={job.out / 'final'}")
    return specs


def stage_credit(cfg: RunConfig, paths: Paths, jobs: list[Job], clock: Clock) -> None:
    out = paths.root / "token-credit"
    specs = credit_sources(jobs)
    done = out / "sources.json"
    if (out / "token_credit.json").is_file() and done.is_file() and json.loads(done.read_text()) == specs:
        print("[credit] done, skipped", flush=True)
        return
    argv = ["eval", "--token_credit", *specs, "--credit_data", str(paths.task / "data" / "truth_test.jsonl"),
            "--reference", str(paths.model), "--tokenizer_name_or_path", str(paths.model),
            *CONTRASTIVE, "--max_credit_rows", str(cfg.preset["credit_rows"]),
            "--output_dir", str(out), "--dtype", "float32", "--chunk_rows", "4", "--disable_tqdm",
            *(["--device", cfg.device] if cfg.device else [])]
    print(f"[credit] finegrain {' '.join(argv)}", flush=True)
    if cfg.dry_run:
        return
    clock.record("credit", finegrain(argv, paths.root / "logs" / "credit.log", cfg.threads))
    done.write_text(json.dumps(specs) + "\n")


def stage_report(cfg: RunConfig, paths: Paths, jobs: list[Job], clock: Clock) -> None:
    from finegrain.ifeval.results import write_results

    dirs = [paths.root / "start"] + [j.out for j in jobs if j.out.is_dir()] + [paths.root / "token-credit"]
    dirs = [d for d in dirs if d.is_dir()]
    argv = ["report", *map(str, dirs), "--output", str(paths.root / "report.html"), "--title",
            f"finegrain on SmolLM2-135M-Instruct, IFEval task ({cfg.setting} setting)"]
    print(f"[report] finegrain {' '.join(argv)}", flush=True)
    if cfg.dry_run:
        return
    clock.record("report", finegrain(argv, paths.root / "logs" / "report.log", cfg.threads))
    table = write_results(paths.root, [j.out for j in jobs], setting=cfg.setting)
    print(table, flush=True)


def run(cfg: RunConfig) -> Path:
    """Run every stage of ``cfg`` in order (module docstring); returns the run directory."""
    paths, jobs = plan(cfg)
    if not cfg.dry_run:
        check_settings(paths, cfg)
    clock = Clock(paths.root / "times.json") if not cfg.dry_run else Clock(Path(os.devnull + ".none"))
    wanted = cfg.stages or list(STAGES)
    start = time.perf_counter()
    if "task" in wanted:
        stage_task(cfg, paths, clock)
    if "train" in wanted:
        stage_train(cfg, paths, jobs, clock)
    # evaluation, token credit and the table cover every finished method of RUN_DIR, also those --methods left out
    finished = [j for j in plan(dataclasses.replace(cfg, methods=[]))[1] if j in jobs or _is_done(j.out)]
    if "eval" in wanted:
        stage_eval(cfg, paths, finished, clock)
    if "credit" in wanted:
        stage_credit(cfg, paths, finished, clock)
    if "report" in wanted:
        stage_report(cfg, paths, finished, clock)
    print(f"finegrain ifeval run: {time.perf_counter() - start:.0f} s this time; results in {paths.root}", flush=True)
    return paths.root


def main(argv: list[str] | None = None) -> int:
    """``finegrain ifeval run [options]``."""
    cfg = parse(RunConfig, list(sys.argv[1:] if argv is None else argv), prog="finegrain ifeval run",
                description=__doc__.split("\n\n")[0])
    run(cfg)
    return 0
