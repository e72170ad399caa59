"""``finegrain demo``: the whole pipeline on the built-in world, with small budgets, ending in one HTML report.

Every stage is the command a user would type (printed before it runs), called in this process:

1. ``finegrain world build``             the world: tokenizer, SFT base model, pairs, revisions, credit truth
2. ``finegrain rm --level ...``          sequence, sentence and token reward models and the TLCR discriminator
3. ``finegrain po --loss ...``           DPO, TDPO2 and T-REG from the SFT model on the world's pairs
4. ``finegrain ppo --reward <token RM>`` PPO with dense token rewards from the token reward model
5. ``finegrain eval``                    each policy against the SFT model, judged by the world's oracle
6. ``finegrain eval --token_credit``     which tokens each reward source credits, against the world's truth
7. ``finegrain report``                  one self-contained HTML file

A stage whose run directory already holds a completed run is skipped, so rerunning the demo after an interruption
continues where it stopped (``--fresh`` starts over). The demo ends with a summary table and the report's path.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from importlib import resources
from pathlib import Path

from finegrain.cli.main import COMMANDS
from finegrain.config import load_function, load_yaml, option, parse
from finegrain.data.files import read_jsonl


@dataclasses.dataclass
class DemoConfig:
    """The end-to-end demo on the built-in world (about 5 minutes on 2 idle CPU cores, the world built first)."""

    output_dir: str = option("runs/demo", "where the demo writes its world, runs and report")
    seed: int = option(0, "seed of the world and every run")
    scale: float = option(1.0, "multiply every training budget (steps) by this factor; 0.2 gives a quick look")
    fresh: bool = option(False, "ignore results of a previous demo in output_dir and redo every stage")
    eval_prompts: int = option(200, "held-out prompts per policy evaluation")


RM_LEVELS = ("sequence", "sentence", "token", "discriminator")
PO_LOSSES = ("dpo", "tdpo2", "treg-dpo")


def recipe(name: str) -> tuple[list[str], int]:
    """``["--config", <shipped configs/world/NAME.yaml>]`` and the recipe's ``max_steps`` (every stage's settings
    live in those files, each key commented; the demo adds only its directories, the seed and the scale)."""
    path = resources.files("finegrain") / "configs" / "world" / f"{name}.yaml"
    return ["--config", str(path)], int(load_yaml(str(path))["max_steps"])


def _scaled(name: str, scale: float) -> list[str]:
    args, steps = recipe(name)
    return args + (["--max_steps", str(max(2, round(steps * scale)))] if scale != 1.0 else [])


def _completed(run_dir: Path) -> bool:
    info = run_dir / "run.json"
    return info.is_file() and json.loads(info.read_text()).get("status") == "completed" and (run_dir / "final").is_dir()


def _run_stage(title: str, command: str, argv: list[str], run_dir: Path) -> float:
    """Run ``finegrain <command> argv`` in this process unless ``run_dir`` already holds a completed run."""
    if _completed(run_dir):
        print(f"  {title}: done earlier ({run_dir})", flush=True)
        return 0.0
    print(f"  {title}: finegrain {command} {' '.join(argv)}", flush=True)
    t = time.time()
    load_function(COMMANDS[command][0])([*argv, "--overwrite_output_dir"])
    return time.time() - t


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(r):
        return "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _last_eval(run_dir: Path) -> dict:
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "eval"]
    return evals[-1] if evals else {}


def run_demo(cfg: DemoConfig) -> dict:
    from finegrain.world import ensure_world, format_summary, is_built
    from finegrain.world.config import WorldConfig

    t0 = time.time()
    out = Path(cfg.output_dir)
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    common = ["--seed", str(cfg.seed), "--disable_tqdm", "false"]

    print("[1/7] the built-in world", flush=True)
    t = time.time()
    built_before = is_built(out / "world")
    world = ensure_world(out / "world", WorldConfig(seed=cfg.seed))  # prints its summary when it builds
    timings["world"] = time.time() - t
    if built_before:
        print(format_summary(json.loads((world / "world.json").read_text())), flush=True)

    def train(title: str, command: str, name: str, *extra: str) -> None:
        """The recipe ``name`` (scaled) into ``runs/name`` on this world."""
        argv = [*_scaled(name, cfg.scale), *extra, "--world_dir", str(world),
                "--output_dir", str(runs / name), *common]
        timings[name] = _run_stage(title, command, argv, runs / name)

    print("\n[2/7] reward models", flush=True)
    for level in RM_LEVELS:
        train(f"{level} reward model", "rm", f"rm-{level}")

    print("\n[3/7] offline preference optimisation", flush=True)
    for loss in PO_LOSSES:
        train(loss, "po", f"po-{loss}")

    print("\n[4/7] PPO with dense token rewards", flush=True)
    train("PPO, token RM reward", "ppo", "ppo-token-rm", "--reward", str(runs / "rm-token" / "final"))

    print("\n[5/7] evaluation against the SFT model, judged by the oracle", flush=True)
    from finegrain.eval.cli import evaluate_policy
    from finegrain.models.loading import ModelCache, resolve_device
    from finegrain.world.app import register

    register(world)  # the world's oracle as a reward source, with this world's rules
    cache = ModelCache(resolve_device(None))
    policies = [f"po-{loss}" for loss in PO_LOSSES] + ["ppo-token-rm"]
    results: dict[str, dict] = {}
    t = time.time()
    for name in policies:
        results[name] = evaluate_policy(
            runs / name / "final", world / "sft", prompts=str(world / "data" / "prompts_test.jsonl"), judge="oracle",
            max_prompts=cfg.eval_prompts, seed=cfg.seed, output_dir=runs / name, models=cache,
        )
    timings["eval"] = time.time() - t

    print("\n[6/7] token credit of every reward source against the world's ground truth", flush=True)
    from finegrain.eval.token_credit import evaluate_token_credit_sources
    from finegrain.world.app import credit_settings

    t = time.time()
    sources = ["truth=oracle-credit", "contrastive", f"implicit-tdpo2=implicit:{runs / 'po-tdpo2'}"] + [
        f"{level}-rm={runs / f'rm-{level}' / 'final'}" for level in RM_LEVELS]
    credit = evaluate_token_credit_sources(sources, **credit_settings(world), output_dir=out / "token-credit",
                                           max_rows=300, models=cache)  # the world's credit rows, SFT, template
    timings["token-credit"] = time.time() - t

    print("\n[7/7] report", flush=True)
    from finegrain.report import build_report

    run_dirs = [runs / f"rm-{lv}" for lv in RM_LEVELS] + [runs / p for p in policies] + [out / "token-credit"]
    report = build_report(run_dirs, out / "report.html", title="finegrain demo on the built-in world")

    ref = next(iter(results.values()))
    rows = [["SFT (reference)", f"{ref['ref_mean_reward']:+.3f}", "-", "0", f"{ref.get('ref_well_formed_rate', float('nan')):.2f}"]]
    for name in policies:
        r = results[name]
        rows.append([name, f"{r['mean_reward']:+.3f}", f"{r['win_rate']:.2f}", f"{r['seq_kl']:.2f}",
                     f"{r.get('well_formed_rate', float('nan')):.2f}"])
    auroc = credit.get("auroc", {})
    rm_rows = []
    for level in RM_LEVELS:
        ev = _last_eval(runs / f"rm-{level}")
        acc = ev.get("accuracy", ev.get("pair_accuracy"))
        a = None if level == "sequence" else auroc.get(f"{level}-rm")  # a sequence score credits no single token
        rm_rows.append([f"{level} RM", f"{acc:.3f}" if isinstance(acc, float) else "-", f"{a:.3f}" if a is not None else "-"])
    for name in ("contrastive", "implicit-tdpo2"):
        a = auroc.get(name)
        rm_rows.append([name, "-", f"{a:.3f}" if a is not None else "-"])
    total = time.time() - t0
    print("\npolicies (oracle reward of samples on held-out prompts; win rate and KL against the SFT model)")
    print(_table(rows, ["policy", "oracle reward", "win rate", "seq KL", "well-formed"]))
    print("\nreward sources (held-out pair accuracy; token-credit AUROC against the world's truth)")
    print(_table(rm_rows, ["source", "pair accuracy", "token AUROC"]))
    summary = {"seconds": round(total, 1), "timings": {k: round(v, 1) for k, v in timings.items()},
               "policies": results, "token_credit_auroc": auroc, "report": str(report)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\ndemo finished in {total / 60:.1f} min; report: {report}")
    return summary


def main(argv: list[str] | None = None) -> int:
    run_demo(parse(DemoConfig, argv, "finegrain demo"))
    return 0
