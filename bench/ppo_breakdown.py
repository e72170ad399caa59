"""Where a PPO step's time goes (generation, scoring, training), and rollout throughput of finegrain's sampler.

Part 1 runs ``finegrain ppo`` (:func:`finegrain.trainers.ppo.train`) on the built-in world for a few steps and
reads the per-phase times it logs for every step (``time/generate``: sampling with the KV cache;
``time/score``: policy/reference log-probs, critic values, rewards and advantages; ``time/train``: the PPO epochs
over minibatches). The first ``warmup`` steps are discarded; the report gives the median seconds per phase and
each phase's share of their sum. By default the policy is the world's SFT model (2 layers, hidden 128, vocabulary
84); ``--hidden`` / ``--layers`` swap in a randomly initialised Llama of that size with the world's tokenizer (it
rarely emits EOS, so every response runs to ``max_new_tokens``, as long generations do in practice).

Part 2 measures rollout tokens per second of :func:`finegrain.rl.rollout.sample_rollouts` against a plain
``transformers`` ``model.generate`` loop on the same model shape and batch, with ``bench/rollout_throughput.py``
(its median of per-pair ratios; target >= 0.9). The model there is a random Llama of the PPO step's shape
(hidden, layers, heads, vocabulary), the batch is ``rollout_batch_size x num_samples`` and the responses
``max_new_tokens`` long.

Both parts run in this process one after the other, with the same torch thread count (``--threads``, default 1:
on a shared 2-core machine one thread is both faster and steadier for models this small).

Usage:

    .venv/bin/python bench/ppo_breakdown.py                               # world SFT model, 8 steps
    .venv/bin/python bench/ppo_breakdown.py --hidden 256 --layers 4       # a bigger (random) policy
    .venv/bin/python bench/ppo_breakdown.py --estimator rloo --num-samples 4 --json out.json

``run(args) -> dict`` is the entry point for ``finegrain bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

PHASES = ("generate", "score", "train")
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="PPO steps (rollout batches)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    p.add_argument("--estimator", default="gae", choices=("gae", "reinforce", "rloo"))
    p.add_argument("--critic", default="separate", choices=("separate", "shared"))
    p.add_argument("--reward", default="oracle")
    p.add_argument("--rollout-batch-size", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--num-mini-batches", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--kl-estimator", default="k1", choices=("k1", "k2", "k3", "full"))
    p.add_argument("--hidden", type=int, default=0, help="random policy of this hidden size (0: the world's SFT model)")
    p.add_argument("--layers", type=int, default=4, help="layers of the random policy")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the random policy")
    p.add_argument("--throughput-repeats", type=int, default=5, help="rollout_throughput.py repetitions (0: skip)")
    p.add_argument("--world-dir", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def _policy(args, world: Path, tokenizer):
    from finegrain.models.build import causal_lm_from_config, tiny_llama_config
    from finegrain.models.loading import load_causal_lm

    if not args.hidden:
        model = load_causal_lm(str(world / "sft"))
    else:
        config = tiny_llama_config(len(tokenizer), hidden_size=args.hidden, num_layers=args.layers,
                                   num_heads=args.heads, max_position_embeddings=512,
                                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
        model = causal_lm_from_config(config, seed=0)
    c = model.config
    shape = {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
             "vocab": c.vocab_size}
    return model, shape


def step_breakdown(args) -> dict:
    """Run PPO for ``args.steps`` steps and summarise the per-phase times it logged."""
    from finegrain.config import parse
    from finegrain.trainers.ppo import PPOConfig, load_inputs, train
    from finegrain.world import ensure_world

    world = ensure_world(args.world_dir)
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--world_dir", str(world), "--output_dir", str(Path(tmp) / "run"), "--disable_tqdm",
                "--logging_steps", "1", "--max_steps", str(args.steps), "--estimator", args.estimator,
                "--critic", args.critic, "--reward", args.reward, "--rollout_batch_size", str(args.rollout_batch_size),
                "--num_samples", str(args.num_samples), "--max_new_tokens", str(args.max_new_tokens),
                "--ppo_epochs", str(args.ppo_epochs), "--num_mini_batches", str(args.num_mini_batches),
                "--per_device_train_batch_size", str(args.micro_batch), "--kl_estimator", args.kl_estimator,
                "--learning_rate", "1e-4", "--lr_scheduler_type", "constant", "--max_eval_samples", "1"]
        cfg = parse(PPOConfig, argv, "finegrain ppo")
        _, tokenizer, prompts, _ = load_inputs(cfg)
        policy, shape = _policy(args, world, tokenizer)
        run_dir = train(cfg, policy.to(args.device), tokenizer, prompts, None)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"][args.warmup :]
    if not rows:
        raise SystemExit(f"--steps {args.steps} leaves no step after --warmup {args.warmup}")
    seconds = {p: statistics.median(r[f"time/{p}"] for r in rows) for p in PHASES}
    total = sum(seconds.values())
    tokens = statistics.median(r["response/length"] for r in rows) * args.rollout_batch_size * args.num_samples
    return {
        "model": shape, "policy": "world SFT model" if not args.hidden else "random Llama (world tokenizer)",
        "steps_measured": len(rows), "seconds": seconds, "step_seconds": total,
        "share": {p: seconds[p] / total for p in PHASES},
        "response_tokens_per_step": tokens,
    }


def _rollout_throughput_module():
    spec = importlib.util.spec_from_file_location("rollout_throughput", HERE / "rollout_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def throughput(args, shape: dict) -> dict:
    """bench/rollout_throughput.py on a random Llama of the PPO policy's shape and the rollout batch."""
    argv = ["--hidden", str(shape["hidden"]), "--layers", str(shape["layers"]), "--heads", str(shape["heads"]),
            "--vocab", str(max(shape["vocab"], 8)), "--batch", str(args.rollout_batch_size * args.num_samples),
            "--new-tokens", str(args.max_new_tokens), "--min-prompt", "4", "--max-prompt", "12",
            "--repeats", str(args.throughput_repeats), "--device", args.device, "--json"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _rollout_throughput_module().main(argv)
    text = out.getvalue()
    print(text, end="")
    result = json.loads(text.strip().splitlines()[-1])
    return {"finegrain_tok_s": result["median_tok_s"]["finegrain"],
            "transformers_tok_s": result["median_tok_s"]["transformers"],
            "ratio": result["ratio"], "identical_samples": f"{result['identical']}/{args.throughput_repeats}"}


def run(args: argparse.Namespace | None = None) -> dict:
    """Both measurements; returns ``{"step": ..., "rollout_throughput": ..., "settings": ...}``."""
    args = args or parse_args([])
    if args.threads:
        torch.set_num_threads(args.threads)
    step = step_breakdown(args)
    results = {"settings": vars(args), "threads": torch.get_num_threads(), "step": step}
    if args.throughput_repeats > 0:
        results["rollout_throughput"] = throughput(args, step["model"])
    s = step
    print(f"PPO step ({s['policy']}, hidden {s['model']['hidden']}, {s['model']['layers']} layers; "
          f"{args.rollout_batch_size} prompts x {args.num_samples}, {args.estimator}, {args.ppo_epochs} PPO epochs; "
          f"median of {s['steps_measured']} steps): {s['step_seconds']:.3f} s")
    for p in PHASES:
        print(f"  {p:<9} {s['seconds'][p]:.3f} s  {100 * s['share'][p]:5.1f} %")
    if "rollout_throughput" in results:
        t = results["rollout_throughput"]
        print(f"rollout tokens/s: finegrain {t['finegrain_tok_s']:.0f}, transformers generate "
              f"{t['transformers_tok_s']:.0f}, ratio {t['ratio']:.3f} (target >= 0.9)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
