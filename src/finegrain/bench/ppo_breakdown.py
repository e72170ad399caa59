"""Where a PPO step's time goes (generation, scoring, training), and rollout throughput on the PPO policy's shape.

Part 1 runs ``finegrain ppo`` (:func:`finegrain.trainers.ppo.train`, oracle reward on the built-in world's prompts)
for a few steps and reads the per-phase times it logs for every step (``time/generate``: sampling with the KV
cache; ``time/score``: policy/reference log-probs, critic values, rewards and advantages; ``time/train``: the PPO
epochs over minibatches). The first ``warmup`` steps are discarded; the result gives the median seconds per phase
and each phase's share of their sum (the ratios). The policy is either

* ``random`` (the default here): a randomly initialised Llama with the world's tokenizer (by default the world SFT
  model's shape: 2 layers, hidden 128), trained on world prompts generated on the spot; it needs no built world,
  rarely emits EOS, so every response runs to ``max_new_tokens``, as long generations do in practice; or
* ``world``: the built-in world's SFT model (``~15``-token responses), which needs the built world; or
* ``dir``: a saved model directory with its tokenizer (``model``; the real-model benchmark passes SmolLM2), on
  prompts of random single-token words of its tokenizer, rewarded by :func:`distinct_words_reward` (a cheap Python
  reward: the world's oracle needs world prompts).

Part 2 (``throughput_repeats`` > 0) runs :mod:`finegrain.bench.rollout_throughput` on a random Llama of the PPO
policy's shape with the rollout batch (``rollout_batch_size x num_samples`` rows, ``max_new_tokens``).

Usage::

    finegrain bench ppo_breakdown
    .venv/bin/python bench/ppo_breakdown.py --steps 8 --throughput-repeats 5        # the world's SFT model
    .venv/bin/python bench/ppo_breakdown.py --hidden 256 --layers 4                 # a bigger random policy
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from finegrain.bench.cli import make_main

PHASES = ("generate", "score", "train")
QUICK = dict(steps=3, warmup=1, rollout_batch_size=8, max_new_tokens=16, ppo_epochs=2, micro_batch=8,
             throughput_repeats=2)
GPU = dict(hidden=2048, layers=8, heads=16, rollout_batch_size=64, max_new_tokens=128, micro_batch=16, bf16=True)
GPU_QUICK = dict(GPU, steps=4, warmup=1, throughput_repeats=2)


def _random_policy_inputs(root: Path, hidden: int, layers: int, heads: int, prompts: int, seed: int) -> tuple[str, str]:
    """A random Llama with the world tokenizer saved to ``root/model``, and ``prompts`` world prompts."""
    from finegrain.bench.synthetic import LlamaShape, build_model
    from finegrain.data.files import write_jsonl
    from finegrain.world.corpus import eval_prompts
    from finegrain.world.tokenizer import build_tokenizer

    tok = build_tokenizer()  # pad, BOS and EOS are 0, 1 and 2, as build_model's config has them
    model_dir = root / "model"
    shape = LlamaShape(hidden=hidden, layers=layers, heads=heads, vocab=len(tok))
    build_model(shape, 512, seed=seed).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in eval_prompts(prompts, seed)])
    return str(model_dir), str(data)


def distinct_words_reward(prompts, responses):
    """A cheap reward for timing PPO on any model: the share of distinct words in the response (0 when empty)."""
    out = []
    for text in responses:
        words = text.split()
        out.append(len(set(words)) / len(words) if words else 0.0)
    return out


def _dir_policy_inputs(root: Path, model_dir: str, prompt_len: int, prompts: int, seed: int) -> str:
    """``prompts`` prompts of ``prompt_len`` random single-token words of ``model_dir``'s tokenizer."""
    from transformers import AutoTokenizer

    from finegrain.bench.synthetic import random_pairs, single_token_words
    from finegrain.data.files import write_jsonl

    words = single_token_words(AutoTokenizer.from_pretrained(model_dir))
    rows = random_pairs(prompts, 0, prompt_len, 1, seed, words=words)
    return str(write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows]))


def step_breakdown(s: dict) -> dict:
    """Run PPO for ``steps`` steps and summarise the per-phase times it logged."""
    from finegrain.bench.measure import reset_accelerate, use_device
    from finegrain.config import parse
    from finegrain.data.files import read_jsonl
    from finegrain.trainers.ppo import PPOConfig, load_inputs, train
    from finegrain.world.app import parse_config

    reward = s["reward"]
    if s["policy"] == "dir" and reward == "oracle":  # the world's oracle scores world prompts only
        reward = "python:finegrain.bench.ppo_breakdown:distinct_words_reward"
    with tempfile.TemporaryDirectory() as tmp:
        opts = {"output_dir": Path(tmp) / "run", "logging_steps": 1, "max_steps": s["steps"], "reward": reward,
                "per_device_train_batch_size": s["micro_batch"], "learning_rate": "1e-4",
                "lr_scheduler_type": "constant", "max_eval_samples": 1,
                **{k: s[k] for k in ("estimator", "critic", "rollout_batch_size", "num_samples", "max_new_tokens",
                                     "ppo_epochs", "num_mini_batches", "kl_estimator", "seed")}}
        prompts = max(64, s["rollout_batch_size"] * (s["steps"] + 1))
        if s["policy"] == "world":
            from finegrain.world import ensure_world

            opts["world_dir"] = ensure_world(s["world_dir"])
        elif s["policy"] == "dir":
            opts.update(model_name_or_path=s["model"], max_prompt_length=s["prompt_len"] + 8,
                        max_length=s["prompt_len"] + 8 + s["max_new_tokens"],
                        dataset_name=_dir_policy_inputs(Path(tmp), s["model"], s["prompt_len"], prompts, s["seed"]))
        else:
            opts["model_name_or_path"], opts["dataset_name"] = _random_policy_inputs(
                Path(tmp), s["hidden"], s["layers"], s["heads"], prompts, s["seed"])
        argv = [a for k, v in opts.items() for a in (f"--{k}", str(v))] + ["--disable_tqdm"] + ["--bf16"] * s["bf16"]
        # the world's oracle reward (and its model when policy is "world") unless the policy is a model directory
        cfg = (parse(PPOConfig, argv, "finegrain ppo") if s["policy"] == "dir"
               else parse_config("ppo", PPOConfig, argv))
        reset_accelerate()
        with use_device(s["device"]):
            policy, tokenizer, prompts, _ = load_inputs(cfg)
            c = policy.config
            shape = {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
                     "vocab": c.vocab_size}
            run_dir = train(cfg, policy, tokenizer, prompts, None)
        rows = read_jsonl(run_dir / "metrics.jsonl")
    rows = [r for r in rows if r["split"] == "train"][s["warmup"]:]
    if not rows:
        raise ValueError(f"steps={s['steps']} leaves no step after warmup={s['warmup']}")
    seconds = {p: statistics.median(r[f"time/{p}"] for r in rows) for p in PHASES}
    total = sum(seconds.values())
    return {"model": shape, "policy": s["policy"], "steps_measured": len(rows), "seconds": seconds,
            "step_seconds": total, "share": {p: seconds[p] / total for p in PHASES},
            "response_length": statistics.median(r["response/length"] for r in rows)}


def run(*, policy: str = "random", hidden: int = 128, layers: int = 2, heads: int = 4, steps: int = 8,
        warmup: int = 2, estimator: str = "gae", critic: str = "separate", reward: str = "oracle",
        rollout_batch_size: int = 32, num_samples: int = 1, max_new_tokens: int = 40, ppo_epochs: int = 4,
        num_mini_batches: int = 1, micro_batch: int = 8, kl_estimator: str = "k1", throughput_repeats: int = 5,
        world_dir: str | None = None, threads: int | None = 1, device: str = "cpu", bf16: bool = False,
        seed: int = 0, model: str | None = None, prompt_len: int = 32) -> dict:
    """Both measurements; returns the result dict (``ratios``: each phase's share of a step; the sampler ratio)."""
    from finegrain.bench import rollout_throughput

    if model is not None:
        policy = "dir"
    if policy not in ("random", "world", "dir"):
        raise ValueError(f"policy must be 'random', 'world' or 'dir', got {policy!r}")
    if steps <= warmup:
        raise ValueError(f"steps ({steps}) must exceed warmup ({warmup})")
    if threads:
        torch.set_num_threads(threads)
    s = dict(policy=policy, hidden=hidden, layers=layers, heads=heads, steps=steps, warmup=warmup,
             estimator=estimator, critic=critic, reward=reward, rollout_batch_size=rollout_batch_size,
             num_samples=num_samples, max_new_tokens=max_new_tokens, ppo_epochs=ppo_epochs,
             num_mini_batches=num_mini_batches, micro_batch=micro_batch, kl_estimator=kl_estimator,
             throughput_repeats=throughput_repeats, world_dir=world_dir, device=device, bf16=bf16, seed=seed,
             model=model, prompt_len=prompt_len)
    step = step_breakdown(s)
    ratios = {f"{p}/step": step["share"][p] for p in PHASES}
    meaning = {f"{p}/step": f"share of a PPO step's time spent in {p} (median per phase / sum of the medians)"
               for p in PHASES}
    figures = {f"{p}_s": {"value": step["seconds"][p], "unit": "s", "note": "median per step"} for p in PHASES}
    figures["step_s"] = {"value": step["step_seconds"], "unit": "s"}
    figures["response_length"] = {"value": step["response_length"], "unit": "tokens", "note": "median per step"}
    result = {"benchmark": "ppo_breakdown", "settings": dict(s, threads=torch.get_num_threads()), "step": step}
    if throughput_repeats > 0:
        m = step["model"]
        prompts = (4, 12) if policy != "dir" else (max(1, prompt_len // 2), prompt_len)
        t = rollout_throughput.run(hidden=m["hidden"], layers=m["layers"], heads=m["heads"], vocab=max(m["vocab"], 8),
                                   batch=rollout_batch_size * num_samples, new_tokens=max_new_tokens,
                                   min_prompt=prompts[0], max_prompt=prompts[1], repeats=throughput_repeats,
                                   device=device, dtype="bfloat16" if bf16 else "float32", model=model)
        result["rollout_throughput"] = t
        ratios["sampler/generate_tok_s"] = t["ratios"]["finegrain/transformers_tok_s"]
        meaning["sampler/generate_tok_s"] = ("rollout tokens/s on the PPO policy's shape and batch: finegrain's "
                                             "sampler / transformers generate")
        for k in ("finegrain_tok_s", "transformers_tok_s", "identical_samples"):
            figures[k] = t["figures"][k]
    return dict(result, ratios=ratios, meaning=meaning, figures=figures)


HELP = {
    "steps": "PPO steps (rollout batches)", "warmup": "first steps left out of the medians",
    "micro_batch": "per_device_train_batch_size", "layers": "layers of the random policy",
    "hidden": "random policy of this hidden size (0: the world's SFT model)",
    "heads": "attention heads of the random policy", "throughput_repeats": "rollout throughput repetitions (0: skip)",
    "model": "a saved model directory with its tokenizer as the policy (prompts of random words, a distinct-words "
             "reward); overrides --hidden",
    "prompt_len": "prompt words with --model",
}


def _policy(kwargs: dict) -> dict:
    """The command line's ``--hidden 0`` (its default) is the world's SFT model, another size a random
    policy."""
    return dict(kwargs, policy="world" if kwargs["hidden"] == 0 else "random", hidden=kwargs["hidden"] or 128)


main = make_main(run, __doc__, help=HELP, defaults={"hidden": 0, "layers": 4}, skip=("policy",),
                 adjust=_policy, choices={"estimator": ("gae", "reinforce", "rloo"),
                                          "critic": ("separate", "shared"),
                                          "kl_estimator": ("k1", "k2", "k3", "full")})

