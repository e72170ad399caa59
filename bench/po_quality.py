"""Quality of DPO, TDPO1, TDPO2, T-REG and T-REG's ablations on the built-in world: oracle reward, well-formedness,
KL to the reference.

Every method starts from the world's SFT model and trains with ``finegrain po`` on the world's training pairs at the
same budget (steps, batch, learning rate, schedule, β), for several seeds (the seed sets the data order and the
sampling). Checkpoints along the way (every ``steps / checkpoints`` steps) are evaluated too, so each run traces
a path in the reward-vs-KL plane. Evaluation, on the world's held-out prompts: ``samples`` responses per prompt
sampled at temperature 1 (the KV-cache sampler :func:`finegrain.rl.rollout.sample_rollouts`), judged by the
oracle (:func:`finegrain.world.judge`: mean score and well-formed rate), and the sequential KL to the SFT
reference ``Σ_t KL(π_θ(·|s_t) ‖ π_ref(·|s_t))`` over the full vocabulary at every sampled position
(:func:`finegrain.rl.rollout.score_rollout` with ``with_full_kl``), averaged over responses.

Methods (names as in the results):

* ``sft``: the starting model (no training), the reference point (KL 0);
* ``dpo``: ``--loss dpo``;
* ``tdpo1`` / ``tdpo2``: ``--loss tdpo1`` / ``tdpo2`` (``alpha`` for TDPO2);
* ``treg``: ``--loss treg-dpo`` with contrastive-prompting token rewards from the SFT model in the paper's
  revision form, the world's revision requests (``--reg_source contrastive``, the world's default template),
  ``treg_alpha`` for α (default: ``po``'s);
* ``treg-control``: the same with the control prefixes (``--contrastive_template control``), the world's form
  before world format 3;
* ``treg-implicit`` (T-REG's ablation): token rewards from a DPO-trained policy, ``--reg_source implicit:RUN``
  with the ``dpo`` run of the same seed (trained first when ``dpo`` is not among the methods);
* ``treg-static`` (T-REG's ablation): ``--weighting static``;
* ``dpo-sft`` (T-REG's ablation): DPO plus an SFT term on the chosen response, ``--loss dpo --rpo_alpha
  sft_weight``.

T-REG runs also record their token-reward diagnostic on the held-out pairs at the end (``treg/shared_reward`` ...,
docs/methods/treg.md).

Outputs: ``bench/results/po_quality.json`` (every run and checkpoint; per method the mean and standard deviation
over seeds of the final checkpoint, and of the reward where each run's path first reaches a KL of 0.25, 0.5, 1,
1.5 and 2) and ``bench/results/po_quality.png`` (reward vs KL: one path per run, final points marked, SFT at the
origin). ``--replot JSON`` summarises and plots an earlier JSON again without training.

Usage:

    .venv/bin/python bench/po_quality.py                     # 3 seeds, the defaults below (~25 min on 2 cores)
    .venv/bin/python bench/po_quality.py --seeds 0 --methods dpo tdpo2 --steps 60   # a quick look
    .venv/bin/python bench/po_quality.py --methods dpo treg treg-control treg-implicit treg-static dpo-sft \
        --out bench/results/po_quality_treg                  # T-REG against DPO, with the paper's ablations

``run(args) -> dict`` runs it from Python (``finegrain bench`` lists this script but does not run it: it takes 10+ minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("dpo", "tdpo1", "tdpo2", "treg", "treg-control", "treg-implicit", "treg-static", "dpo-sft")
DEFAULT_METHODS = ("dpo", "tdpo1", "tdpo2", "treg")
LOSS = {"dpo": "dpo", "tdpo1": "tdpo1", "tdpo2": "tdpo2", "treg": "treg-dpo", "treg-control": "treg-dpo",
        "treg-implicit": "treg-dpo", "treg-static": "treg-dpo", "dpo-sft": "dpo"}
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from finegrain.bench.cli import ScriptParser

    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (the budget; ~2.4 epochs)")
    p.add_argument("--batch", type=int, default=32, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.5, help="TDPO2's α")
    p.add_argument("--treg-alpha", type=float, default=None, help="T-REG's α (default: po's, the best of the paper's "
                                                                 "grid 0.1, 0.25, 0.5 on this world)")
    p.add_argument("--sft-weight", type=float, default=1.0, help="dpo-sft: weight of the SFT term (po's --rpo_alpha)")
    p.add_argument("--checkpoints", type=int, default=5, help="evaluated checkpoints per run (the last is the end)")
    p.add_argument("--prompts", type=int, default=200, help="held-out prompts (the world's prompts_test)")
    p.add_argument("--samples", type=int, default=2, help="responses per prompt")
    p.add_argument("--world-dir", default=None)
    p.add_argument("--out", default=str(RESULTS / "po_quality"), help="output path without extension")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--replot", default=None, help="summarise and plot an earlier results JSON instead of training")
    return p.parse_args(argv)


@torch.no_grad()
def evaluate_policy(policy, reference, tokenizer, prompts: list[str], args, seed: int) -> dict[str, float]:
    """Mean oracle score, well-formed rate, sequential KL(π ‖ π_ref) and length of sampled responses."""
    from finegrain.data.collate import collate_completions
    from finegrain.data.tokenize import tokenize_prompt
    from finegrain.rewards.base import decode_responses
    from finegrain.rl.rollout import sample_rollouts, score_rollout
    from finegrain.world import judge, load_world_config

    world_cfg = load_world_config(args.world_dir)
    policy.eval()
    gen = torch.Generator().manual_seed(10_000 + seed)
    scores, formed, kls, lengths = [], [], [], []
    for lo in range(0, len(prompts), 128):
        chunk = prompts[lo : lo + 128]
        batch = collate_completions(
            [{"prompt_input_ids": tokenize_prompt(tokenizer, p), "completion_input_ids": []} for p in chunk],
            tokenizer.pad_token_id)
        roll = sample_rollouts(policy, batch.prompt_input_ids, batch.prompt_attention_mask,
                               max_new_tokens=world_cfg.max_new_tokens, temperature=1.0, num_samples=args.samples,
                               tokenizer=tokenizer, generator=gen)
        scored = score_rollout(policy, roll, ref_model=reference, with_full_kl=True, chunk_rows=64)
        kls += scored["full_kl"].sum(dim=-1).tolist()
        lengths += roll.completion_mask.sum(dim=-1).tolist()
        texts = decode_responses(tokenizer, roll)
        for i, text in enumerate(texts):
            j = judge(chunk[i // args.samples], text, world_cfg.rules)
            scores.append(j.score)
            formed.append(float(j.well_formed))
    n = len(scores)
    return {"reward": sum(scores) / n, "well_formed": sum(formed) / n, "kl": sum(kls) / n,
            "length": sum(lengths) / n}


def train_run(method: str, seed: int, args, out: Path, dpo_run: Path | None = None) -> Path:
    """Train one method from the SFT model; returns the run directory (checkpoints kept). ``dpo_run``: the DPO run
    whose final policy gives ``treg-implicit`` its token rewards."""
    from finegrain.trainers import po
    from finegrain.world.app import prepare, with_world_options

    every = max(1, args.steps // args.checkpoints)
    extra = {}
    if method == "tdpo2":
        extra["alpha"] = args.alpha
    if method.startswith("treg") and args.treg_alpha is not None:
        extra["alpha"] = args.treg_alpha
    if method == "treg-control":
        extra["contrastive_template"] = "control"
    if method == "treg-implicit":
        extra["reg_source"] = f"implicit:{dpo_run / 'final'}"
    if method == "treg-static":
        extra["weighting"] = "static"
    if method == "dpo-sft":
        extra["rpo_alpha"] = args.sft_weight
    cfg = with_world_options(po.POConfig)(
        world_dir=args.world_dir, loss=LOSS[method], beta=args.beta, learning_rate=args.lr, warmup_steps=args.warmup,
        lr_scheduler_type="constant", max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=64, seed=seed, save_steps=every, save_total_limit=args.checkpoints + 1,
        logging_steps=10, output_dir=str(out), overwrite_output_dir=True, disable_tqdm=True,
        precompute_ref_log_probs=not method.startswith("tdpo"),  # same numbers as live, fewer reference passes
        max_eval_samples=128, **extra,
    )
    prepare("po", cfg)  # the world's model, pairs and contrastive template, as `finegrain po` fills them
    model, tokenizer, train_data, eval_data = po.load_inputs(cfg)
    return po.train(cfg, model, tokenizer, train_data, eval_data)


DIAGNOSTICS = ("treg/shared_reward", "treg/shared_abs_reward", "treg/diff_reward", "treg/diff_abs_reward",
               "treg/shared_share")


def run_diagnostics(run_dir: Path) -> dict[str, float]:
    """T-REG's token-reward diagnostic on the held-out pairs at the end of a run (empty for other methods)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("split") == "eval"]
    return {k: last[-1][k] for k in DIAGNOSTICS if last and k in last[-1]}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


KL_GRID = (0.25, 0.5, 1.0, 1.5, 2.0)


def reward_at_kl(path: list[tuple[float, float]], kl: float) -> float | None:
    """Reward where a run's path (KL, reward), from the SFT point on, first reaches ``kl`` (linear in between).

    None when the run never gets that far from the reference within its budget.
    """
    for (k0, r0), (k1, r1) in zip(path, path[1:]):
        if k0 <= kl <= k1 and k1 > k0:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0)
    return None


def summarise(results: dict) -> None:
    """Per method: mean ± std over seeds of the final checkpoint, and of the reward at each KL of ``KL_GRID``."""
    sft = results["sft"]["reward"]["mean"]
    for method, runs in results["runs"].items():
        finals = [r["checkpoints"][-1] for r in runs]
        summary = {k: _mean_std([f[k] for f in finals]) for k in ("reward", "well_formed", "kl", "length")}
        at = {}
        for kl in KL_GRID:
            values = [reward_at_kl([(0.0, sft)] + [(c["kl"], c["reward"]) for c in r["checkpoints"]], kl) for r in runs]
            reached = [v for v in values if v is not None]
            at[str(kl)] = {**_mean_std(reached), "runs": len(reached)} if reached else {"runs": 0}
        summary["reward_at_kl"] = at
        diagnostics = [r.get("diagnostics") or {} for r in runs]
        if all(diagnostics):
            summary["diagnostics"] = {k: _mean_std([d[k] for d in diagnostics]) for k in diagnostics[0]}
        results["final"][method] = summary


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dpo": "tab:blue", "tdpo1": "tab:orange", "tdpo2": "tab:green", "treg": "tab:red",
              "treg-control": "tab:pink", "treg-implicit": "tab:purple", "treg-static": "tab:brown",
              "dpo-sft": "tab:cyan"}
    fig, ax = plt.subplots(figsize=(7, 5))
    sft = results["sft"]
    ax.errorbar([sft["kl"]["mean"]], [sft["reward"]["mean"]], yerr=[sft["reward"]["std"]], fmt="ks", label="sft")
    for method, runs in results["runs"].items():
        for k, run in enumerate(runs):
            xs = [0.0] + [c["kl"] for c in run["checkpoints"]]
            ys = [sft["reward"]["mean"]] + [c["reward"] for c in run["checkpoints"]]
            ax.plot(xs, ys, "-", color=colors[method], alpha=0.35, lw=1)
            ax.plot(xs[-1], ys[-1], "o", color=colors[method], label=method if k == 0 else None)
        final = results["final"][method]
        ax.errorbar([final["kl"]["mean"]], [final["reward"]["mean"]], xerr=[final["kl"]["std"]],
                    yerr=[final["reward"]["std"]], fmt="D", color=colors[method], ms=9, mec="k", capsize=3)
    s = results["settings"]
    ax.set_xlabel("sequential KL(policy ‖ SFT reference), nats per response")
    ax.set_ylabel("mean oracle reward of sampled responses")
    ax.set_title(f"built-in world: {s['steps']} steps × {s['batch']} pairs, β={s['beta']}, lr={s['lr']}, "
                 f"{len(s['seeds'])} seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace | None = None) -> dict:
    """Train and evaluate every method and seed; write the JSON and the plot; return the results."""
    from finegrain.models.build import freeze
    from finegrain.models.loading import load_causal_lm, load_tokenizer
    from finegrain.world import ensure_world

    args = args or parse_args([])
    if args.treg_alpha is None:
        from finegrain.trainers.po import TREG_DEFAULT_ALPHA

        args.treg_alpha = TREG_DEFAULT_ALPHA  # recorded in the results' settings
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    args.world_dir = str(ensure_world(args.world_dir))
    world = Path(args.world_dir)
    tokenizer = load_tokenizer(str(world / "sft"))
    reference = freeze(load_causal_lm(str(world / "sft")))
    prompts = [json.loads(line)["prompt"] for line in (world / "data" / "prompts_test.jsonl").read_text().splitlines()]
    prompts = prompts[: args.prompts]
    sft_runs = [evaluate_policy(reference, reference, tokenizer, prompts, args, seed) for seed in args.seeds]
    results = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
               "sft": {k: _mean_std([r[k] for r in sft_runs]) for k in sft_runs[0]}, "runs": {}, "final": {}}
    print(f"sft: reward {results['sft']['reward']['mean']:.3f}, well-formed {results['sft']['well_formed']['mean']:.3f}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        methods = sorted(args.methods, key=lambda m: m != "dpo")  # DPO first: treg-implicit reads its runs
        for method in methods:
            results["runs"][method] = []
            for seed in args.seeds:
                t1 = time.time()
                dpo_run = Path(tmp) / f"dpo-{seed}"
                if method == "treg-implicit" and not (dpo_run / "final").is_dir():
                    train_run("dpo", seed, args, dpo_run)
                run_dir = train_run(method, seed, args, Path(tmp) / f"{method}-{seed}", dpo_run)
                checkpoints = []
                from finegrain.trainers.loop import checkpoint_dirs

                for ckpt in checkpoint_dirs(run_dir):
                    policy = load_causal_lm(str(ckpt / "model"))
                    step = int(ckpt.name.split("-")[1])
                    checkpoints.append({"step": step, **evaluate_policy(policy, reference, tokenizer, prompts, args, seed)})
                results["runs"][method].append({"seed": seed, "checkpoints": checkpoints,
                                                "diagnostics": run_diagnostics(run_dir)})
                last = checkpoints[-1]
                print(f"{method} seed {seed}: reward {last['reward']:.3f}, well-formed {last['well_formed']:.3f}, "
                      f"KL {last['kl']:.3f} ({time.time() - t1:.0f} s)", file=sys.stderr, flush=True)
    summarise(results)
    results["seconds"] = round(time.time() - t0, 1)
    results["world_format"] = json.loads((world / "world.json").read_text()).get("format")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _with(out, ".json").write_text(json.dumps(results, indent=2))
    plot(results, _with(out, ".png"))
    return results


def _with(out: Path, ext: str) -> Path:
    """``out`` plus an extension (not ``with_suffix``: ``po_quality_alpha0.25`` must not lose its ``.25``)."""
    return out.parent / f"{out.name}{ext}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:  # summarise and plot the runs of an earlier JSON again, without training
        results = json.loads(Path(args.replot).read_text())
        summarise(results)
        out = Path(args.out)
        _with(out, ".json").write_text(json.dumps(results, indent=2))
        plot(results, _with(out, ".png"))
    else:
        results = run(args)
    print(f"{'method':<14} {'reward':>15} {'well-formed':>15} {'KL':>15}")
    rows = [("sft", results["sft"])] + list(results["final"].items())
    for name, r in rows:
        cells = [f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}" for k in ("reward", "well_formed", "kl")]
        print(f"{name:<14} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15}")
    print(f"reward where the runs first reach a KL (mean ± std over the runs that reach it, of {len(results['settings']['seeds'])}):")
    print(f"{'method':<14} " + " ".join(f"{'KL ' + str(k):>17}" for k in KL_GRID))
    for name, r in results["final"].items():
        cells = [f"{a['mean']:.3f} ± {a['std']:.3f} ({a['runs']})" if a["runs"] else "not reached"
                 for a in (r["reward_at_kl"][str(k)] for k in KL_GRID)]
        print(f"{name:<14} " + " ".join(f"{c:>17}" for c in cells))
    diag = {name: r["diagnostics"] for name, r in results["final"].items() if r.get("diagnostics")}
    if diag:
        print("T-REG token rewards on the held-out pairs at the end (mean over seeds): r̂ and |r̂| per shared / "
              "differing token, share of shared tokens")
        for name, d in diag.items():
            print(f"{name:<14} " + " ".join(f"{k.split('/')[1]} {v['mean']:+.4f}" for k, v in d.items()))
    print(f"({results['seconds']} s; mean ± standard deviation over seeds {results['settings']['seeds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
