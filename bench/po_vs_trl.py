"""Step time of ``finegrain po`` against TRL's ``DPOTrainer``, and of TDPO2 and precomputed-reference DPO against DPO.

All runs train the same tiny Llama (built from a config with random weights, saved once to a temporary directory)
on the same synthetic pairs (random words of a word-level tokenizer, written to a local JSONL file), with the same
per-device batch, lengths, optimizer (AdamW, constant learning rate, gradient clipping at 1.0), β and no
evaluation, no checkpoints, no gradient checkpointing, no precomputation unless named:

* ``finegrain-dpo``: ``finegrain.trainers.po.train`` with ``loss="dpo"`` (frozen reference copy);
* ``trl-dpo``: ``trl.DPOTrainer`` (sigmoid loss, the same explicit reference copy, ``report_to=[]``);
* ``finegrain-tdpo2``: the same as ``finegrain-dpo`` with ``loss="tdpo2"`` (full-vocabulary KL per position);
* ``finegrain-dpo-precomputed``: ``finegrain-dpo`` with ``precompute_ref_log_probs=True`` (the reference pass
  runs before the first step and is not timed).

The runs are interleaved round by round (every configuration once per round, several rounds), so a machine whose
load drifts slows every configuration alike. Per-step times are the gaps between the ends of consecutive
optimizer steps (a trainer callback for TRL, a wrapper of ``loop.optimizer_step`` for finegrain); the first
``warmup`` steps of every run are discarded, and the median over all rounds is reported, with the ratios
``finegrain-dpo / trl-dpo`` (target <= 1.0), ``finegrain-tdpo2 / finegrain-dpo`` (target <= 1.25) and
``finegrain-dpo-precomputed / finegrain-dpo`` (target <= 0.75).

Usage:

    .venv/bin/python bench/po_vs_trl.py                       # hidden 256, 4 layers, vocab 16k, 4 pairs of ~160 tokens
    .venv/bin/python bench/po_vs_trl.py --rounds 2 --steps 6  # quicker
    .venv/bin/python bench/po_vs_trl.py --json results.json

``run(args) -> dict`` is the entry point for ``finegrain bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("finegrain-dpo", "trl-dpo", "finegrain-tdpo2", "finegrain-dpo-precomputed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt words (every prompt has this length)")
    p.add_argument("--response-len", type=int, default=128, help="longest response in words (responses: 50-100%%)")
    p.add_argument("--pairs", type=int, default=256, help="pairs in the data set")
    p.add_argument("--batch", type=int, default=4, help="pairs per device per step")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="steps discarded at the start of every run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--workdir", default=None, help="where the model and data are written (default: a temp dir)")
    return p.parse_args(argv)


def build_inputs(args: argparse.Namespace, root: Path) -> tuple[Path, Path]:
    """A word-level tokenizer + tiny Llama (random weights) in ``root/model``, and synthetic pairs in ``root/pairs.jsonl``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from finegrain.models.build import causal_lm_from_config, tiny_llama_config

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(args.vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    model_dir = root / "model"
    max_len = args.prompt_len + args.response_len + 8
    config = tiny_llama_config(args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                               max_position_embeddings=max_len, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    causal_lm_from_config(config, seed=0).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    rng = random.Random(0)
    words = list(vocab)[len(specials):]

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    data = root / "pairs.jsonl"
    with data.open("w") as f:
        for _ in range(args.pairs):
            lo = args.response_len // 2
            # a leading space keeps the prompt a token prefix of prompt + response when TRL joins the strings
            f.write(json.dumps({"prompt": text(args.prompt_len), "chosen": " " + text(rng.randint(lo, args.response_len)),
                                "rejected": " " + text(rng.randint(lo, args.response_len))}) + "\n")
    return model_dir, data


def _max_length(args) -> int:
    return args.prompt_len + args.response_len + 4  # prompt (+BOS) + response (+EOS): nothing is ever cut


def run_finegrain(args, model_dir: Path, data: Path, out: Path, loss: str, precompute: bool) -> list[float]:
    """Per-step times of one ``finegrain po`` run."""
    from finegrain.trainers import loop, po

    cfg = po.POConfig(
        model_name_or_path=str(model_dir), dataset_name=str(data), loss=loss, beta=args.beta,
        precompute_ref_log_probs=precompute, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=2 * args.batch, max_length=_max_length(args),
        max_prompt_length=args.prompt_len + 2, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", logging_steps=10**6, save_steps=0, output_dir=str(out),
        overwrite_output_dir=True, disable_tqdm=True, seed=0,
    )
    model, tokenizer, train_data, _ = po.load_inputs(cfg)
    ends: list[float] = []
    original = loop.optimizer_step

    def timed(*a, **kw):
        result = original(*a, **kw)
        ends.append(time.perf_counter())
        return result

    loop.optimizer_step = timed
    try:
        po.train(cfg, model, tokenizer, train_data)
    finally:
        loop.optimizer_step = original
    return [b - a for a, b in zip(ends, ends[1:])]


def run_trl(args, model_dir: Path, data: Path, out: Path) -> list[float]:
    """Per-step times of one ``trl.DPOTrainer`` run on the same model, data and settings."""
    import copy

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **kw):
            ends.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = copy.deepcopy(model).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=str(data), split="train")
    cfg = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch, max_length=_max_length(args),
        learning_rate=args.lr, lr_scheduler_type="constant", max_steps=args.steps, beta=args.beta,
        report_to=[], logging_steps=10**6, save_strategy="no", eval_strategy="no", precompute_ref_log_probs=False,
        gradient_checkpointing=False, disable_tqdm=True, seed=0, dataloader_num_workers=0, bf16=False,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Timer()])
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])]


def run(args: argparse.Namespace | None = None) -> dict:
    """Run the benchmark; returns ``{"settings", "median_step_s", "step_s", "ratios"}``."""
    import torch

    args = args or parse_args([])
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        model_dir, data = build_inputs(args, root)
        times: dict[str, list[float]] = {c: [] for c in args.configs}
        for r in range(args.rounds):
            for name in args.configs:
                out = root / f"run-{name}-{r}"
                if name == "trl-dpo":
                    steps = run_trl(args, model_dir, data, out)
                else:
                    loss = "tdpo2" if "tdpo2" in name else "dpo"
                    steps = run_finegrain(args, model_dir, data, out, loss, name.endswith("precomputed"))
                kept = steps[max(0, args.warmup - 1):]  # gaps start after step 1; drop warm-up steps
                times[name] += kept
                print(f"round {r + 1}/{args.rounds} {name:<27} median {statistics.median(kept):.3f} s/step",
                      file=sys.stderr, flush=True)
    median = {k: statistics.median(v) for k, v in times.items() if v}
    ratios = {}
    for label, (a, b) in {"finegrain_dpo/trl_dpo": ("finegrain-dpo", "trl-dpo"),
                          "finegrain_tdpo2/finegrain_dpo": ("finegrain-tdpo2", "finegrain-dpo"),
                          "precomputed/live_reference": ("finegrain-dpo-precomputed", "finegrain-dpo")}.items():
        if a in median and b in median:
            ratios[label] = median[a] / median[b]
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "workdir")}
    settings["torch_threads"] = torch.get_num_threads()
    return {"settings": settings, "median_step_s": median, "step_s": times, "ratios": ratios}


TARGETS = {"finegrain_dpo/trl_dpo": 1.0, "finegrain_tdpo2/finegrain_dpo": 1.25, "precomputed/live_reference": 0.75}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    for name, s in results["median_step_s"].items():
        print(f"{name:<27} {s:.3f} s/step (median of {len(results['step_s'][name])})")
    for name, value in results["ratios"].items():
        print(f"{name:<32} {value:.3f}  (target <= {TARGETS[name]})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
