"""Step time of ``finegrain po`` against TRL's ``DPOTrainer``, and of TDPO2 and precomputed-reference DPO against DPO.

All runs train the same Llama (built from a config with random weights, saved once to a temporary directory) on
the same synthetic pairs (random words of a word-level tokenizer, one local JSONL file), with the same per-device
batch, lengths, optimizer (AdamW, constant learning rate, gradient clipping at 1.0), beta, precision, and no
evaluation, no checkpoints, no gradient checkpointing, no precomputation unless named:

* ``finegrain-dpo``: :func:`finegrain.trainers.po.train` with ``loss="dpo"`` (frozen reference copy);
* ``trl-dpo``: ``trl.DPOTrainer`` (sigmoid loss, the same explicit reference copy, ``report_to=[]``);
* ``finegrain-tdpo2``: ``finegrain-dpo`` with ``loss="tdpo2"`` (full-vocabulary KL at every position);
* ``finegrain-dpo-precomputed``: ``finegrain-dpo`` with ``precompute_ref_log_probs=True`` (the reference pass runs
  before the first step and is not timed).

The runs are interleaved round by round (every configuration once per round), so a machine whose load drifts slows
every configuration alike. Per-step times are the gaps between the ends of consecutive optimizer steps (a trainer
callback for TRL, a wrapper of ``loop.optimizer_step`` for finegrain; on CUDA after a device synchronisation); the
first ``warmup`` steps of every run are discarded and the median over all rounds is reported, with the ratios
``finegrain-dpo / trl-dpo``, ``finegrain-tdpo2 / finegrain-dpo`` and ``finegrain-dpo-precomputed / finegrain-dpo``
(and, in ``round_ratios`` and the notes, the same ratios round by round, whose spread shows the load's effect).

On CUDA (the GPU path: bf16 mixed precision, SDPA attention, by default the ~1B Llama of
:data:`finegrain.bench.synthetic.LLAMA_1B`) every configuration also reports tokens per second (prompt + response
tokens of both rows of every pair) and model-FLOPs utilisation against the device's peak
(:mod:`finegrain.bench.flops`: policy forward + backward, plus the reference forward where it runs live).

Usage::

    finegrain bench po_vs_trl
    .venv/bin/python bench/po_vs_trl.py --rounds 2 --steps 6  # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from finegrain.bench.synthetic import LLAMA_1B

CONFIGS = ("finegrain-dpo", "trl-dpo", "finegrain-tdpo2", "finegrain-dpo-precomputed")
RATIOS = {
    "finegrain_dpo/trl_dpo": ("finegrain-dpo", "trl-dpo",
                              "median step time: finegrain po --loss dpo / TRL DPOTrainer (same model, data, batch)"),
    "finegrain_tdpo2/finegrain_dpo": ("finegrain-tdpo2", "finegrain-dpo",
                                      "median step time: TDPO2 (full-vocabulary KL per token) / DPO"),
    "precomputed/live_reference": ("finegrain-dpo-precomputed", "finegrain-dpo",
                                   "median step time: DPO with precomputed reference log-probs / live reference"),
}
QUICK = dict(hidden=64, layers=2, heads=2, vocab=2000, prompt_len=16, response_len=32, pairs=32, batch=2, steps=4,
             warmup=1, rounds=1)
GPU = dict(LLAMA_1B.as_dict(), prompt_len=128, response_len=384, pairs=512, batch=8, steps=10, warmup=3, rounds=2, bf16=True)
GPU_QUICK = dict(GPU, steps=5, warmup=2, rounds=1, pairs=128)


def _max_length(prompt_len: int, response_len: int) -> int:
    return prompt_len + response_len + 4  # prompt (+BOS) + response (+EOS): nothing is ever cut


def _sync(device: str):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_finegrain(s: dict, model_dir: Path, data: Path, out: Path, loss: str, precompute: bool) -> list[float]:
    """Per-step times of one ``finegrain po`` run."""
    from finegrain.bench.measure import reset_accelerate
    from finegrain.trainers import loop, po

    reset_accelerate()
    cfg = po.POConfig(
        model_name_or_path=str(model_dir), dataset_name=str(data), loss=loss, beta=s["beta"],
        precompute_ref_log_probs=precompute, per_device_train_batch_size=s["batch"],
        per_device_eval_batch_size=2 * s["batch"], max_length=_max_length(s["prompt_len"], s["response_len"]),
        max_prompt_length=s["prompt_len"] + 2, max_steps=s["steps"], learning_rate=s["lr"],
        lr_scheduler_type="constant", logging_steps=10**6, save_steps=0, output_dir=str(out),
        overwrite_output_dir=True, disable_tqdm=True, seed=0, bf16=s["bf16"],
    )
    model, tokenizer, train_data, _ = po.load_inputs(cfg)
    ends: list[float] = []
    original = loop.optimizer_step

    def timed(*a, **kw):
        result = original(*a, **kw)
        _sync(s["device"])
        ends.append(time.perf_counter())
        return result

    loop.optimizer_step = timed
    try:
        po.train(cfg, model, tokenizer, train_data)
    finally:
        loop.optimizer_step = original
    return [b - a for a, b in zip(ends, ends[1:])]


def run_trl(s: dict, model_dir: Path, data: Path, out: Path) -> list[float]:
    """Per-step times of one ``trl.DPOTrainer`` run on the same model, data and settings."""
    import copy

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from finegrain.bench.measure import reset_accelerate

    reset_accelerate()
    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **kw):
            _sync(s["device"])
            ends.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = copy.deepcopy(model).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=str(data), split="train")
    cfg = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=s["batch"],
        max_length=_max_length(s["prompt_len"], s["response_len"]), learning_rate=s["lr"],
        lr_scheduler_type="constant", max_steps=s["steps"], beta=s["beta"], report_to=[], logging_steps=10**6,
        save_strategy="no", eval_strategy="no", precompute_ref_log_probs=False, gradient_checkpointing=False,
        disable_tqdm=True, seed=0, dataloader_num_workers=0, bf16=s["bf16"], use_cpu=s["device"] == "cpu",
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Timer()])
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])]


def _throughput(s: dict, model_dir: Path, data: Path, median: dict[str, float]) -> tuple[dict, list[str]]:
    """Tokens/s of every configuration and, on a known CUDA device, its MFU."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finegrain.bench.flops import mfu, model_flops, peak_bf16_flops
    from finegrain.bench.synthetic import pair_token_counts

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    counts = pair_token_counts(rows)
    with torch.device("meta"):  # the weights are not needed to count them
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    mf = model_flops(meta)
    tokens = statistics.fmean(2 * p + c + r for p, c, r in counts) * s["batch"]
    forward = statistics.fmean(mf.forward(p + c, c) + mf.forward(p + r, r) for p, c, r in counts) * s["batch"]
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if s["device"] == "cuda" else None
    notes = []
    if s["device"] == "cuda" and peak is None:
        notes.append(f"MFU omitted: no peak bf16 FLOP/s known for {torch.cuda.get_device_name()!r}")
    out = {"attn_implementation": getattr(meta.config, "_attn_implementation", None)}
    for name, seconds in median.items():
        # the policy's forward + backward (3 F); the reference forward (F) unless its log-probs were precomputed
        flops = forward * (3 if name.endswith("precomputed") else 4)
        out[name] = {"tokens_per_s": tokens / seconds, "model_flops_per_step": flops}
        if peak is not None:
            out[name]["mfu"] = mfu(flops, seconds, peak[1])
            out[name]["peak_device"] = peak[0]
    return out, notes


def run(*, hidden: int = 256, layers: int = 4, heads: int = 4, kv_heads: int | None = None,
        intermediate: int | None = None, vocab: int = 16000, tie_embeddings: bool = True, prompt_len: int = 32,
        response_len: int = 128, pairs: int = 256, batch: int = 4, steps: int = 8, warmup: int = 2, rounds: int = 3,
        lr: float = 1e-5, beta: float = 0.1, threads: int | None = None, configs: tuple[str, ...] | list[str] = CONFIGS,
        device: str = "cpu", bf16: bool = False, workdir: str | None = None) -> dict:
    """Run the configurations interleaved and return the result dict (``ratios``, ``median_step_s``, ``step_s``,
    and on CUDA ``throughput`` with tokens/s and MFU)."""
    import importlib.util

    import torch

    from finegrain.bench.measure import use_device
    from finegrain.bench.synthetic import LlamaShape, preference_inputs

    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    if steps - max(warmup, 1) < 1:
        raise ValueError(f"steps ({steps}) must exceed warmup ({warmup}) by at least 1 (and be >= 2)")
    if threads:
        torch.set_num_threads(threads)
    notes = []
    configs = list(configs)
    if "trl-dpo" in configs and importlib.util.find_spec("trl") is None:
        configs.remove("trl-dpo")
        notes.append("trl is not installed (pip install 'finegrain[dev]'): the TRL baseline was skipped")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shape = LlamaShape(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                       vocab=vocab, tie_embeddings=tie_embeddings)
    s = dict(prompt_len=prompt_len, response_len=response_len, pairs=pairs, batch=batch, steps=steps, warmup=warmup,
             rounds=rounds, lr=lr, beta=beta, device=device, bf16=bf16)
    times: dict[str, list[float]] = {c: [] for c in configs}
    round_medians: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, use_device(device):
        root = Path(tmp)
        model_dir, data = preference_inputs(root, shape, prompt_len=prompt_len, response_len=response_len, pairs=pairs)
        for r in range(rounds):
            for name in configs:
                out = root / f"run-{name}-{r}"
                if name == "trl-dpo":
                    gaps = run_trl(s, model_dir, data, out)
                else:
                    loss = "tdpo2" if "tdpo2" in name else "dpo"
                    gaps = run_finegrain(s, model_dir, data, out, loss, name.endswith("precomputed"))
                shutil.rmtree(out, ignore_errors=True)  # a 1B model's final save would fill the disk
                kept = gaps[max(0, warmup - 1):]  # gaps start after step 1; drop the warm-up steps
                times[name] += kept
                round_medians[name].append(statistics.median(kept))
                print(f"  po_vs_trl round {r + 1}/{rounds} {name:<27} median {statistics.median(kept):.3f} s/step",
                      file=sys.stderr, flush=True)
        median = {k: statistics.median(v) for k, v in times.items() if v}
        throughput, more = _throughput(s, model_dir, data, median)
    notes += more
    ratios = {k: median[a] / median[b] for k, (a, b, _) in RATIOS.items() if a in median and b in median}
    # the same ratio within each round: its spread shows how much the machine's load moved it
    round_ratios = {k: [x / y for x, y in zip(round_medians[RATIOS[k][0]], round_medians[RATIOS[k][1]])] for k in ratios}
    if rounds > 1:
        notes += [f"{k} round by round: " + ", ".join(f"{v:.3f}" for v in r) for k, r in round_ratios.items()]
    figures = {f"{k}_s_per_step": {"value": v, "unit": "s"} for k, v in median.items()}
    for k, t in throughput.items():
        if isinstance(t, dict) and device == "cuda":
            figures[f"{k}_tokens_per_s"] = {"value": t["tokens_per_s"], "unit": "tok/s"}
            if "mfu" in t:
                figures[f"{k}_mfu"] = {"value": t["mfu"], "unit": "%", "note": f"of {t['peak_device']} dense bf16 peak"}
    settings = dict(shape.as_dict(), **s, configs=configs, threads=torch.get_num_threads())
    return {"benchmark": "po_vs_trl", "settings": settings, "ratios": ratios,
            "meaning": {k: RATIOS[k][2] for k in ratios}, "figures": figures, "median_step_s": median,
            "step_s": times, "round_ratios": round_ratios, "throughput": throughput, "notes": notes}


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
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (both trainers)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--workdir", default=None, help="where the model and data are written (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from finegrain.bench.table import print_result

    a = parse_args(argv)
    kwargs = {k: v for k, v in vars(a).items() if k != "json"}
    kwargs["threads"] = kwargs["threads"] or None
    print_result(run(**kwargs), a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
