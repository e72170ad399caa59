"""Does PPO learn faster from token-level rewards than from a sequence reward? The fine-grained claim, on the world.

The TLCR and minimal-edit papers claim that at the same sample budget PPO with token-level rewards (a token
reward model, a token discriminator) reaches a given true reward with fewer samples than PPO with a sequence
reward model's score on the last token; the SRM paper claims the same for sentence rewards. On the built-in world
the true reward is the oracle, so the claim can be measured directly. Every condition runs ``finegrain ppo`` from
the world's SFT model with the same settings (steps, prompts per step, learning rate, KL coefficient, GAE with a
separate critic, per-batch reward normalisation so that sources of different scales are comparable) and differs
only in ``--reward``:

* ``oracle``: the oracle's score on the last token -- the best a *sequence* reward could be;
* ``oracle_credit``: the oracle's per-word ground-truth credit on every token (same return per response) -- the
  best a *token* reward could be. These two isolate the effect of where the reward lands from the quality of
  learned reward models;
* ``sequence_rm``, ``sentence_rm``, ``token_rm``, ``discriminator``: reward models trained once (seed 0) by
  ``finegrain rm --level ...`` on the world's pairs / revisions; their held-out accuracy and token-credit AUROC are
  reported beside the PPO results. These need ``finegrain.trainers.rm``; without it only the two oracle conditions
  run;
* ``token_rm_plain_bt``: the token RM trained with the edit term off (``--edit_weight 0``: Bradley-Terry on the
  summed token rewards only; docs/methods/token-rm.md);
* ``discriminator_<mode>``: the same discriminator read through one of TLCR's discrete baselines
  (``--reward DIR:mode=<mode>``: ``sign`` ±1/0, ``fixed``, ``thresholded``, ``random``, ``positive``,
  ``negative``; docs/methods/tlcr.md), and ``discriminator_eos_model`` (the discriminator's own output on the end
  token instead of the official 0). ``discriminator`` is the continuous ``2·P(+) − 1``.

Every run logs, per rollout batch, the oracle reward and well-formedness of its samples and the KL to the
reference (``objective/kl``, the k1 sum over the response), so each seed gives curves against samples; at the end
the policy is evaluated on held-out prompts (sampled responses: oracle reward, full-vocabulary KL). Summaries per
condition (mean ± standard error over seeds): the mean oracle reward over the whole budget (area under the
curve / samples), samples until the smoothed curve first reaches ``--threshold``, the final training reward and KL,
and the held-out evaluation; beside them the final response length and the final training reward (the source's
own raw reward), which show when a policy exploits its reward model.

Runs are subprocesses (``python -m finegrain ...``), ``--workers`` at a time, each with ``--threads`` torch threads.

Outputs: ``bench/results/ppo_quality.json`` and ``bench/results/ppo_quality.png`` (oracle reward and KL against
samples, mean and standard error over seeds).

Usage:

    .venv/bin/python bench/ppo_quality.py                                  # all conditions, 3 seeds
    .venv/bin/python bench/ppo_quality.py --conditions oracle oracle_credit --seeds 0 --steps 20   # a quick look
    .venv/bin/python bench/ppo_quality.py --rm-dir runs/rms --reuse-rms    # keep trained reward models
    .venv/bin/python bench/ppo_quality.py --replot bench/results/ppo_quality.json

``run(args) -> dict`` runs it from Python (``finegrain bench`` lists this script but does not run it: it takes 10+ minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ORACLE_CONDITIONS = {"oracle": "oracle", "oracle_credit": "oracle:credit"}
REWARD_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sequence": ("sequence", ()),
    "sentence": ("sentence", ()),
    "token": ("token", ()),
    "token_plain_bt": ("token", ("--edit_weight", "0")),
    "discriminator": ("discriminator", ()),
}
"""Reward models trained once: name -> (level, extra ``finegrain rm`` flags)."""
DISCRIMINATOR_MODES = ("sign", "fixed", "thresholded", "random", "positive", "negative")
RM_CONDITIONS: dict[str, tuple[str, str]] = {
    "sequence_rm": ("sequence", ""), "sentence_rm": ("sentence", ""), "token_rm": ("token", ""),
    "token_rm_plain_bt": ("token_plain_bt", ""), "discriminator": ("discriminator", ""),
    "discriminator_eos_model": ("discriminator", ":eos=model"),
    **{f"discriminator_{m}": ("discriminator", f":mode={m}" + (":seed={seed}" if m == "random" else ""))
       for m in DISCRIMINATOR_MODES},
}
"""PPO conditions on learned rewards: name -> (reward model, options appended to its directory in ``--reward``;
``{seed}`` is the PPO run's seed)."""
DEFAULT_CONDITIONS = ("oracle", "oracle_credit", "sequence_rm", "sentence_rm", "token_rm", "discriminator")
CONDITIONS = tuple(ORACLE_CONDITIONS) + tuple(RM_CONDITIONS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from finegrain.bench.cli import ScriptParser

    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conditions", nargs="*", default=list(DEFAULT_CONDITIONS), choices=CONDITIONS)
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40, help="rollout batches per run (the sample budget)")
    p.add_argument("--rollout-batch-size", type=int, default=32, help="prompts (= samples) per rollout batch")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kl-coef", type=float, default=0.1)
    p.add_argument("--estimator", default="gae", choices=("gae", "reinforce", "rloo"))
    p.add_argument("--normalization", default="batch", choices=("none", "batch", "running"))
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=16, help="per_device_train_batch_size")
    p.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts evaluated at the end")
    p.add_argument("--threshold", type=float, default=0.5, help="oracle reward for the samples-to-threshold summary")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window (steps) for samples-to-threshold")
    p.add_argument("--rm-lr", type=float, default=1e-3, help="reward-model learning rate (cosine)")
    p.add_argument("--rm-epochs", type=float, default=2.0)
    p.add_argument("--rm-batch", type=int, default=32)
    p.add_argument("--rm-dir", default=None, help="where reward models are trained (default: a temporary directory)")
    p.add_argument("--reuse-rms", action="store_true", help="use completed reward-model runs found in --rm-dir")
    p.add_argument("--runs-dir", default=None, help="keep the PPO run directories here (default: temporary)")
    p.add_argument("--ppo-args", default="", help="extra `finegrain ppo` options for every run, e.g. '--kl_coef 0.3'")
    p.add_argument("--workers", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--world-dir", default=None)
    p.add_argument("--out", default=str(RESULTS / "ppo_quality"), help="output path without extension")
    p.add_argument("--replot", default=None, help="redraw the PNG and reprint the summary of this results JSON, no runs")
    return p.parse_args(argv)


def _finegrain(argv: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "finegrain", *argv], stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"finegrain {argv[0]} failed (exit {done.returncode}); log {log}:\n" + "\n".join(tail))


def _rm_available() -> bool:
    try:
        import finegrain.rewards.registry  # noqa: F401
        import finegrain.trainers.rm  # noqa: F401
    except ImportError:
        return False
    return True


def train_reward_models(args, world: Path, rm_dir: Path, names: list[str]) -> dict[str, dict]:
    """``finegrain rm --level L [flags]`` for each reward model of :data:`REWARD_MODELS` (once, seed 0); returns
    name -> {dir, level, flags, eval metrics, seconds}."""
    out: dict[str, dict] = {}

    def one(name: str) -> None:
        level, flags = REWARD_MODELS[name]
        run_dir = rm_dir / name
        info_path = run_dir / "run.json"
        if not (args.reuse_rms and info_path.is_file() and json.loads(info_path.read_text()).get("status") == "completed"):
            start = time.perf_counter()
            _finegrain(["rm", "--level", level, "--world_dir", str(world), "--output_dir", str(run_dir),
                        "--overwrite_output_dir", "--disable_tqdm", "--seed", "0", "--learning_rate", str(args.rm_lr),
                        "--lr_scheduler_type", "cosine", "--num_train_epochs", str(args.rm_epochs),
                        "--per_device_train_batch_size", str(args.rm_batch), *flags], rm_dir / f"{name}.log",
                       args.threads)
            seconds = time.perf_counter() - start
        else:
            seconds = None
        summary = json.loads(info_path.read_text()).get("summary", {})
        out[name] = {"dir": str(run_dir), "level": level, "flags": list(flags), "eval": summary.get("eval", {}),
                     "seconds": seconds}

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        list(pool.map(one, names))
    return out


def _ppo_argv(args, world: Path, reward: str, seed: int, out: Path) -> list[str]:
    return ["ppo", "--world_dir", str(world), "--output_dir", str(out), "--overwrite_output_dir", "--disable_tqdm",
            "--seed", str(seed), "--reward", reward, "--max_steps", str(args.steps), "--logging_steps", "1",
            "--rollout_batch_size", str(args.rollout_batch_size), "--learning_rate", str(args.lr),
            "--lr_scheduler_type", "constant", "--kl_coef", str(args.kl_coef), "--estimator", args.estimator,
            "--reward_normalization", args.normalization, "--ppo_epochs", str(args.ppo_epochs),
            "--per_device_train_batch_size", str(args.micro_batch), "--max_eval_samples", str(args.eval_prompts),
            "--eval_sampling", "sample", *shlex.split(args.ppo_args)]


def _read_run(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    curve = {k: [r.get(k) for r in train] for k in ("samples", "oracle/reward", "oracle/well_formed", "objective/kl",
                                                     "rewards/raw", "response/length", "time/generate", "time/score",
                                                     "time/train")}
    return {"curve": curve, "eval": evals[-1] if evals else {}}


def _mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def _samples_to(curve: dict, threshold: float, window: int) -> int | None:
    """Samples logged at the first step where the mean oracle reward of the last ``window`` batches reaches
    ``threshold`` (None if never)."""
    rewards, samples = curve["oracle/reward"], curve["samples"]
    for i in range(len(rewards)):
        lo = max(0, i - window + 1)
        if statistics.fmean(rewards[lo : i + 1]) >= threshold and i + 1 >= min(window, len(rewards)):
            return samples[i]
    return None


def summarise(args, runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per condition: mean ± standard error over seeds of the budget-average reward, samples to threshold, the final
    training reward / KL (mean of the last ``smooth`` steps) and the held-out evaluation."""
    out = {}
    for cond, seeds in runs.items():
        per_seed = list(seeds.values())
        k = args.smooth
        reached = [_samples_to(r["curve"], args.threshold, k) for r in per_seed]
        budget = [statistics.fmean(r["curve"]["oracle/reward"]) for r in per_seed]
        final_kl = [statistics.fmean(r["curve"]["objective/kl"][-k:]) for r in per_seed]
        stats = {
            "per_seed": {"seeds": list(seeds), "budget_mean_oracle_reward": budget, "final_kl": final_kl,
                         "std": {"budget_mean_oracle_reward": statistics.stdev(budget) if len(budget) > 1 else 0.0,
                                 "final_kl": statistics.stdev(final_kl) if len(final_kl) > 1 else 0.0}},
            "initial_length": _mean_se([statistics.fmean(r["curve"]["response/length"][:k]) for r in per_seed]),
            "budget_mean_oracle_reward": _mean_se(budget),
            "final_oracle_reward": _mean_se([statistics.fmean(r["curve"]["oracle/reward"][-k:]) for r in per_seed]),
            "final_well_formed": _mean_se([statistics.fmean(r["curve"]["oracle/well_formed"][-k:]) for r in per_seed]),
            "final_kl": _mean_se(final_kl),
            "final_training_reward": _mean_se([statistics.fmean(r["curve"]["rewards/raw"][-k:]) for r in per_seed]),
            "final_length": _mean_se([statistics.fmean(r["curve"]["response/length"][-k:]) for r in per_seed]),
            "eval_oracle_reward": _mean_se([r["eval"].get("oracle/reward") for r in per_seed]),
            "eval_well_formed": _mean_se([r["eval"].get("oracle/well_formed") for r in per_seed]),
            "eval_kl": _mean_se([r["eval"].get("objective/kl") for r in per_seed]),
        }
        hit = [s for s in reached if s is not None]
        stats["samples_to_threshold"] = {"per_seed": reached, "reached": f"{len(hit)}/{len(reached)}",
                                         "mean_of_reached": statistics.fmean(hit) if hit else None}
        out[cond] = stats
    return out


def effective_kl_coef(settings: dict) -> float:
    """The KL coefficient the runs used: ``--kl-coef``, unless ``--ppo-args`` sets ``--kl_coef`` (it comes last)."""
    extra = shlex.split(settings.get("ppo_args") or "")
    value = settings["kl_coef"]
    for i, arg in enumerate(extra[:-1]):
        if arg in ("--kl_coef", "--kl-coef"):
            value = float(extra[i + 1])
    return value


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (cond, seeds) in enumerate(results["runs"].items()):
        curves = [r["curve"] for r in seeds.values()]
        n = min(len(c["samples"]) for c in curves)
        # batch k was drawn by the policy trained on the (k-1) batches before it
        x = [v - results["settings"]["rollout_batch_size"] for v in curves[0]["samples"][:n]]
        for ax, key in zip(axes, ("oracle/reward", "objective/kl")):
            stats = [_mean_se([c[key][j] for c in curves]) for j in range(n)]
            mean = [m for m, _ in stats]
            se = [s for _, s in stats]
            ax.plot(x, mean, color=f"C{i}", label=cond)
            ax.fill_between(x, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                            color=f"C{i}", alpha=0.2)
    s = results["settings"]
    axes[0].axhline(s["threshold"], color="grey", lw=0.8, ls=":")
    axes[0].set_ylabel("oracle reward of the rollout batch")
    axes[1].set_ylabel("KL to the reference (Σ_t log-ratio)")
    for ax in axes:
        ax.set_xlabel("samples trained on before the rollout batch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"finegrain ppo on the built-in world: {s['estimator']}, lr {s['lr']}, KL coef {effective_kl_coef(s)}, "
                 f"{len(s['seeds'])} seeds (mean ± s.e.)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace | None = None) -> dict:
    """Train the reward models, run every condition and seed, summarise, write JSON + PNG; returns the results."""
    args = args or parse_args([])
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        results["runs"] = {c: {int(k): v for k, v in seeds.items()} for c, seeds in results["runs"].items()}
        plot(results, Path(args.replot).with_suffix(".png"))
        _print_summary(results)
        return results
    from finegrain.world import ensure_world

    start = time.perf_counter()
    world = ensure_world(args.world_dir)
    conditions = list(args.conditions)
    notes = []
    wanted_rms = list(dict.fromkeys(RM_CONDITIONS[c][0] for c in conditions if c in RM_CONDITIONS))
    if wanted_rms and not _rm_available():
        notes.append("finegrain.trainers.rm / finegrain.rewards.registry are not available: only the oracle "
                     "conditions ran")
        conditions = [c for c in conditions if c in ORACLE_CONDITIONS]
        wanted_rms = []
    with tempfile.TemporaryDirectory() as tmp:
        rm_dir = Path(args.rm_dir or Path(tmp) / "rms")
        runs_dir = Path(args.runs_dir or Path(tmp) / "ppo")
        rm_dir.mkdir(parents=True, exist_ok=True)
        runs_dir.mkdir(parents=True, exist_ok=True)
        rms = train_reward_models(args, world, rm_dir, wanted_rms) if wanted_rms else {}
        rm_seconds = time.perf_counter() - start
        jobs = []
        for cond in conditions:
            for seed in args.seeds:
                if cond in ORACLE_CONDITIONS:
                    reward = ORACLE_CONDITIONS[cond]
                else:
                    name, options = RM_CONDITIONS[cond]
                    reward = rms[name]["dir"] + options.format(seed=seed)
                jobs.append((cond, seed, reward))

        def one(job):
            cond, seed, reward = job
            out = runs_dir / f"{cond}-seed{seed}"
            t0 = time.perf_counter()
            _finegrain(_ppo_argv(args, world, reward, seed, out), runs_dir / f"{cond}-seed{seed}.log", args.threads)
            result = _read_run(out)
            result["seconds"] = time.perf_counter() - t0
            print(f"  {cond} seed {seed}: final oracle reward "
                  f"{statistics.fmean(result['curve']['oracle/reward'][-args.smooth:]):.3f} in {result['seconds']:.0f} s",
                  flush=True)
            return job, result

        print(f"{len(jobs)} PPO runs, {args.workers} at a time", flush=True)
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            finished = list(pool.map(one, jobs))
    runs: dict[str, dict[int, dict]] = {c: {} for c in conditions}
    for (cond, seed, _), result in finished:
        runs[cond][seed] = result
    results = {
        "settings": {**vars(args), "world_dir": str(world)},
        "notes": notes,
        "reward_models": rms,
        "summary": summarise(args, runs),
        "runs": runs,
        "seconds": {"reward_models": rm_seconds, "total": time.perf_counter() - start},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    _print_summary(results)
    return results


def _print_summary(results: dict) -> None:
    s = results["settings"]
    print(f"\nPPO on the world: {s['steps']} steps x {s['rollout_batch_size']} samples, KL coef {effective_kl_coef(s)}, "
          f"seeds {s['seeds']}; "
          f"mean ± s.e. over seeds; threshold {s['threshold']}")
    for name, info in results["reward_models"].items():
        shown = {k: round(v, 3) for k, v in info["eval"].items() if k in ("accuracy", "auroc", "edit_auroc")}
        print(f"  reward model {name}: held-out {shown}")
    print(f"  {'condition':<26}{'budget mean':>16}{'final reward':>16}{'final KL':>14}{'eval reward':>16}"
          f"{'samples to thr.':>20}{'length':>14}{'its reward':>14}")
    def f(st, key):
        m, e = st[key]
        return f"{m:.3f}±{e:.3f}"

    for cond, st in results["summary"].items():
        thr = st["samples_to_threshold"]
        reached = thr["mean_of_reached"]
        shown = f"{reached:.0f} ({thr['reached']})" if reached is not None else f"never ({thr['reached']})"
        print(f"  {cond:<26}{f(st, 'budget_mean_oracle_reward'):>16}{f(st, 'final_oracle_reward'):>16}"
              f"{f(st, 'final_kl'):>14}{f(st, 'eval_oracle_reward'):>16}{shown:>20}{f(st, 'final_length'):>14}"
              f"{f(st, 'final_training_reward'):>14}")
    for note in results["notes"]:
        print(f"  note: {note}")
    print(f"  total {results['seconds']['total']:.0f} s (reward models {results['seconds']['reward_models']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
