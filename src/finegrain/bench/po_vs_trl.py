"""Step time of ``finegrain po`` against TRL's ``DPOTrainer``, and of TDPO2 and precomputed-reference DPO against DPO.

All runs train the same random Llama (saved once to a temporary directory) on the same synthetic pairs with the
same batch, lengths, optimizer, beta and precision, and no precomputation unless named (the settings in full:
docs/benchmarks.md, po_vs_trl):

* ``finegrain-dpo``: :func:`finegrain.trainers.po.train` with ``loss="dpo"`` (frozen reference copy);
* ``trl-dpo``: ``trl.DPOTrainer`` (sigmoid loss, the same explicit reference copy, ``report_to=[]``);
* ``finegrain-tdpo2``: ``finegrain-dpo`` with ``loss="tdpo2"`` (full-vocabulary KL at every position);
* ``finegrain-dpo-precomputed``: ``finegrain-dpo`` with ``precompute_ref_log_probs=True`` (the reference pass runs
  before the first step and is not timed);
* ``finegrain-dpo-lora`` and ``trl-dpo-lora`` (not in the default selection): the same two trainers with the same
  LoRA adapter (peft, rank ``lora_r``, alpha ``2 lora_r``, no dropout, every linear layer but the LM head), the
  reference being the policy with its adapter disabled in both.

``model``, when given, is a Hugging Face model directory with its tokenizer (the real-model benchmark passes the
converted SmolLM2-135M-Instruct of docs/ifeval.md): the shape arguments are then ignored and the texts are random
words that the model's tokenizer encodes as one token each, so that lengths are exact as with the word tokenizer.

The runs are interleaved round by round (every configuration once per round), so a machine whose load drifts slows
every configuration alike. Per-step times are the gaps between the ends of consecutive optimizer steps (a trainer
callback for TRL, a wrapper of ``loop.optimizer_step`` for finegrain; on CUDA after a device synchronisation); the
first ``warmup`` steps of every run are discarded and the median over all rounds is reported, with the ratios
``finegrain-dpo / trl-dpo``, ``finegrain-tdpo2 / finegrain-dpo`` and ``finegrain-dpo-precomputed / finegrain-dpo``
(and, in ``round_ratios`` and the notes, the same ratios round by round, whose spread shows the load's effect).

Every configuration also reports tokens per second (prompt + response tokens of both rows of every pair) and its
model FLOPs per step (:mod:`finegrain.models.flops`: the policy's forward + backward, plus the reference forward
where it runs live; for LoRA the backward computes no gradient of the frozen weights: see :func:`step_flops`). On
CUDA (the GPU path of docs/benchmarks.md) they give the model-FLOPs utilisation against the device's peak; given
``peak_flops`` (FLOP/s, e.g. a measured matmul peak on CPU), the fraction of that peak.

Usage::

    finegrain bench po_vs_trl
    .venv/bin/python bench/po_vs_trl.py --rounds 2 --steps 6  # quicker
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from finegrain.bench.cli import make_main
from finegrain.bench.synthetic import LLAMA_1B

DEFAULT_CONFIGS = ("finegrain-dpo", "trl-dpo", "finegrain-tdpo2", "finegrain-dpo-precomputed")
CONFIGS = DEFAULT_CONFIGS + ("finegrain-dpo-lora", "trl-dpo-lora")
RATIOS = {
    "finegrain_dpo/trl_dpo": ("finegrain-dpo", "trl-dpo",
                              "median step time: finegrain po --loss dpo / TRL DPOTrainer (same model, data, batch)"),
    "finegrain_tdpo2/finegrain_dpo": ("finegrain-tdpo2", "finegrain-dpo",
                                      "median step time: TDPO2 (full-vocabulary KL per token) / DPO"),
    "precomputed/live_reference": ("finegrain-dpo-precomputed", "finegrain-dpo",
                                   "median step time: DPO with precomputed reference log-probs / live reference"),
    "finegrain_dpo_lora/trl_dpo_lora": ("finegrain-dpo-lora", "trl-dpo-lora",
                                        "median step time, LoRA (reference = adapter disabled): finegrain po / TRL "
                                        "DPOTrainer"),
}
QUICK = dict(hidden=64, layers=2, heads=2, vocab=2000, prompt_len=16, response_len=32, pairs=32, batch=2, steps=4,
             warmup=1, rounds=1)
GPU = dict(LLAMA_1B.as_dict(), prompt_len=128, response_len=384, pairs=512, batch=8, steps=10, warmup=3, rounds=2, bf16=True)
GPU_QUICK = dict(GPU, steps=5, warmup=2, rounds=1, pairs=128)


def _max_length(prompt_len: int, response_len: int) -> int:
    return prompt_len + response_len + 4  # prompt (+BOS) + response (+EOS): nothing is ever cut


def _gaps(ends: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(wall-clock, process CPU) seconds between consecutive step ends."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(ends, ends[1:])]


def run_finegrain(s: dict, model_dir: Path, data: Path, out: Path, loss: str, precompute: bool,
                  lora: bool = False, profile=None) -> list[tuple[float, float]]:
    """Per-step (wall-clock, CPU) times of one ``finegrain po`` run (``profile``: a started ``torch.profiler.profile`` whose
    ``step()`` is called after every optimizer step)."""
    from finegrain.bench.measure import after_optimizer_step, clock, reset_accelerate
    from finegrain.trainers import po

    reset_accelerate()
    cfg = po.POConfig(
        model_name_or_path=str(model_dir), dataset_name=str(data), loss=loss, beta=s["beta"],
        precompute_ref_log_probs=precompute, per_device_train_batch_size=s["batch"],
        per_device_eval_batch_size=2 * s["batch"], max_length=_max_length(s["prompt_len"], s["response_len"]),
        max_prompt_length=s["prompt_len"] + 2, max_steps=s["steps"], learning_rate=s["lr"],
        lr_scheduler_type="constant", logging_steps=10**6, save_steps=0, output_dir=str(out),
        overwrite_output_dir=True, disable_tqdm=True, seed=0, bf16=s["bf16"], use_peft=lora,
        lora_r=s["lora_r"], lora_alpha=2 * s["lora_r"], lora_dropout=0.0,
    )
    model, tokenizer, train_data, _ = po.load_inputs(cfg)
    ends: list[tuple[float, float]] = []

    def step_end(*_):
        ends.append(clock(s["device"]))
        if profile is not None:
            profile.step()

    with after_optimizer_step(step_end):
        po.train(cfg, model, tokenizer, train_data)
    return _gaps(ends)


def run_trl(s: dict, model_dir: Path, data: Path, out: Path, lora: bool = False,
            profile=None) -> list[tuple[float, float]]:
    """Per-step (wall-clock, CPU) times of one ``trl.DPOTrainer`` run on the same model, data and settings (with ``lora``: a peft
    ``LoraConfig`` like finegrain's and no reference copy)."""
    import copy

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from finegrain.bench.measure import clock, reset_accelerate

    reset_accelerate()
    ends: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **kw):
            ends.append(clock(s["device"]))
            if profile is not None:
                profile.step()

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref, peft_config = copy.deepcopy(model).eval(), None
    if lora:
        from peft import LoraConfig

        ref = None
        peft_config = LoraConfig(r=s["lora_r"], lora_alpha=2 * s["lora_r"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
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
                         callbacks=[Timer()], peft_config=peft_config)
    trainer.train()
    return _gaps(ends)


def step_flops(mf, counts: list[tuple[int, int, int]], batch: int, config: str, lora: int | None = None) -> float:
    """Model FLOPs of one optimizer step of ``config``: ``batch`` pairs of the mean pair of ``counts`` (prompt,
    chosen, rejected tokens), the LM head at the response positions only. The policy trains on both rows
    (:meth:`~finegrain.models.flops.ModelFlops.train`, with ``lora`` adapter weights for the LoRA configurations);
    the reference runs forward on both rows unless its log-probs were precomputed. Work a trainer does beyond that
    (TRL's LM head over prompt and padding positions on CPU, the chunked head's recomputation) does not count."""
    lora_weights = lora if config.endswith("lora") else None
    per_pair = []
    for p, c, r in counts:
        flops = mf.train(p + c, c, lora_params=lora_weights) + mf.train(p + r, r, lora_params=lora_weights)
        if not config.endswith("precomputed"):
            flops += mf.forward(p + c, c) + mf.forward(p + r, r)
        per_pair.append(flops)
    return statistics.fmean(per_pair) * batch


def _throughput(s: dict, model_dir: Path, data: Path, median: dict[str, float], tokenizer=None,
                peak_flops: float | None = None) -> tuple[dict, list[str]]:
    """Tokens/s and model FLOPs per step of every configuration; on a known CUDA device its MFU; given
    ``peak_flops``, the achieved FLOP/s as a fraction of it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finegrain.bench.synthetic import pair_token_counts
    from finegrain.data.files import read_jsonl
    from finegrain.models.flops import lora_params, mfu, model_flops, peak_bf16_flops

    counts = pair_token_counts(read_jsonl(data), tokenizer)
    with torch.device("meta"):  # the weights are not needed to count them
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    mf = model_flops(meta)
    lora = lora_params(meta, s.get("lora_r", 16))
    tokens = statistics.fmean(2 * p + c + r for p, c, r in counts) * s["batch"]
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if s["device"] == "cuda" else None
    notes = []
    if s["device"] == "cuda" and peak is None:
        notes.append(f"MFU omitted: no peak bf16 FLOP/s known for {torch.cuda.get_device_name()!r}")
    out = {"attn_implementation": getattr(meta.config, "_attn_implementation", None), "lora_params": lora,
           "mean_pair_tokens": statistics.fmean(2 * p + c + r for p, c, r in counts)}
    for name, seconds in median.items():
        flops = step_flops(mf, counts, s["batch"], name, lora)
        out[name] = {"tokens_per_s": tokens / seconds, "model_flops_per_step": flops,
                     "achieved_flops_per_s": flops / seconds}
        if peak is not None:
            out[name]["mfu"] = mfu(flops, seconds, peak[1])
            out[name]["peak_device"] = peak[0]
        if peak_flops:
            out[name]["of_peak"] = mfu(flops, seconds, peak_flops)
    return out, notes


def _one_run(name: str, s: dict, model_dir: Path, data: Path, out: Path, profile=None) -> list[tuple[float, float]]:
    lora = name.endswith("-lora")
    if name.startswith("trl-"):
        return run_trl(s, model_dir, data, out, lora=lora, profile=profile)
    loss = "tdpo2" if "tdpo2" in name else "dpo"
    return run_finegrain(s, model_dir, data, out, loss, name.endswith("precomputed"), lora=lora, profile=profile)


def _profile(name: str, s: dict, model_dir: Path, data: Path, out: Path) -> dict:
    """One more short run of ``name`` with the profiler recording its second step (the first is a warm-up)."""
    from finegrain.bench.profiling import step_profiler, summarize

    with step_profiler(skip=1) as prof:
        gaps = _one_run(name, dict(s, steps=3), model_dir, data, out, profile=prof)
    shutil.rmtree(out, ignore_errors=True)
    return dict(summarize(prof), step_s=gaps[0][0] if gaps else None, step_cpu_s=gaps[0][1] if gaps else None)


def run(*, hidden: int = 256, layers: int = 4, heads: int = 4, kv_heads: int | None = None,
        intermediate: int | None = None, vocab: int = 16000, tie_embeddings: bool = True, prompt_len: int = 32,
        response_len: int = 128, pairs: int = 256, batch: int = 4, steps: int = 8, warmup: int = 2, rounds: int = 3,
        lr: float = 1e-5, beta: float = 0.1, threads: int | None = None,
        configs: tuple[str, ...] | list[str] = DEFAULT_CONFIGS, device: str = "cpu", bf16: bool = False,
        workdir: str | None = None, model: str | None = None, lora_r: int = 16, peak_flops: float | None = None,
        profile: tuple[str, ...] | list[str] = ()) -> dict:
    """Run the configurations interleaved and return the result dict (``ratios``, ``median_step_s``, ``step_s``,
    ``throughput`` with tokens/s and model FLOPs, on CUDA MFU, given ``peak_flops`` the fraction of it). ``model``:
    an existing model directory with its tokenizer instead of a random Llama of the given shape. ``profile``:
    configurations to run once more, briefly, under ``torch.profiler`` (:mod:`finegrain.bench.profiling`)."""
    import importlib.util

    import torch

    from finegrain.bench.measure import use_device
    from finegrain.bench.synthetic import LlamaShape, preference_inputs, random_pairs, single_token_words
    from finegrain.data.files import write_jsonl

    unknown = [c for c in list(configs) + list(profile) if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    if steps - max(warmup, 1) < 1:
        raise ValueError(f"steps ({steps}) must exceed warmup ({warmup}) by at least 1 (and be >= 2)")
    if threads:
        torch.set_num_threads(threads)
    notes = []
    configs, profile = list(configs), list(profile)
    if any(c.startswith("trl-") for c in configs + profile) and importlib.util.find_spec("trl") is None:
        configs = [c for c in configs if not c.startswith("trl-")]
        profile = [c for c in profile if not c.startswith("trl-")]
        notes.append("trl is not installed (pip install 'finegrain[dev]'): the TRL baselines were skipped")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shape = LlamaShape(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                       vocab=vocab, tie_embeddings=tie_embeddings)
    s = dict(prompt_len=prompt_len, response_len=response_len, pairs=pairs, batch=batch, steps=steps, warmup=warmup,
             rounds=rounds, lr=lr, beta=beta, device=device, bf16=bf16, lora_r=lora_r)
    times: dict[str, list[float]] = {c: [] for c in configs}
    cpu_times: dict[str, list[float]] = {c: [] for c in configs}
    round_medians: dict[str, list[float]] = {c: [] for c in configs}
    profiles = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, use_device(device):
        root = Path(tmp)
        tokenizer = None
        if model is None:
            model_dir, data = preference_inputs(root, shape, prompt_len=prompt_len, response_len=response_len,
                                                pairs=pairs)
        else:
            from transformers import AutoTokenizer

            model_dir = Path(model)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            data = write_jsonl(root / "pairs.jsonl", random_pairs(pairs, 0, prompt_len, response_len,
                                                                  words=single_token_words(tokenizer)))
        for r in range(rounds):
            for name in configs:
                out = root / f"run-{name}-{r}"
                gaps = _one_run(name, s, model_dir, data, out)
                shutil.rmtree(out, ignore_errors=True)  # a 1B model's final save would fill the disk
                kept = gaps[max(0, warmup - 1):]  # gaps start after step 1; drop the warm-up steps
                times[name] += [w for w, _ in kept]
                cpu_times[name] += [c for _, c in kept]
                round_medians[name].append(statistics.median(w for w, _ in kept))
                print(f"  po_vs_trl round {r + 1}/{rounds} {name:<27} median {round_medians[name][-1]:.3f} s/step",
                      file=sys.stderr, flush=True)
        for name in profile:
            profiles[name] = _profile(name, s, model_dir, data, root / f"profile-{name}")
            print(f"  po_vs_trl profiled {name}", file=sys.stderr, flush=True)
        median = {k: statistics.median(v) for k, v in times.items() if v}
        cpu_median = {k: statistics.median(v) for k, v in cpu_times.items() if v}
        throughput, more = _throughput(s, model_dir, data, median, tokenizer, peak_flops)
        cpu_throughput, _ = _throughput(s, model_dir, data, cpu_median, tokenizer, peak_flops)
    notes += more
    ratios = {k: median[a] / median[b] for k, (a, b, _) in RATIOS.items() if a in median and b in median}
    # on a shared machine a one-thread process's CPU time leaves out the time it waited for a core
    cpu_ratios = {k: cpu_median[a] / cpu_median[b] for k, (a, b, _) in RATIOS.items()
                  if a in cpu_median and b in cpu_median}
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
        if isinstance(t, dict) and "of_peak" in t:
            figures[f"{k}_of_matmul_peak"] = {"value": t["of_peak"], "unit": "%",
                                              "note": f"{t['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s of model FLOPs"}
    if model is None:
        settings = dict(shape.as_dict(), **s)
    else:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(model)
        settings = dict(model=str(model), hidden=c.hidden_size, layers=c.num_hidden_layers, vocab=c.vocab_size, **s)
    settings.update(configs=configs, threads=torch.get_num_threads())
    return {"benchmark": "po_vs_trl", "settings": settings, "ratios": ratios,
            "meaning": {k: RATIOS[k][2] for k in ratios}, "figures": figures, "median_step_s": median,
            "step_s": times, "round_ratios": round_ratios, "throughput": throughput,
            "cpu_time": {"ratios": cpu_ratios, "median_step_s": cpu_median, "step_s": cpu_times,
                         "throughput": cpu_throughput},
            "profiles": profiles, "notes": notes}


HELP = {
    "prompt_len": "prompt words (every prompt has this length)",
    "response_len": "longest response in words (responses: 50-100%%)", "pairs": "pairs in the data set",
    "batch": "pairs per device per step", "steps": "optimizer steps per run",
    "warmup": "steps discarded at the start of every run", "rounds": "interleaved rounds of every configuration",
    "model": "a model directory with its tokenizer (default: a random Llama of the shape above)",
    "lora_r": "LoRA rank of the -lora configurations", "profile": "configurations to profile (one step)",
    "bf16": "bfloat16 mixed precision (both trainers)",
    "workdir": "where the model and data are written (default: a temp dir)",
}


main = make_main(run, __doc__, help=HELP, choices={"configs": CONFIGS, "profile": CONFIGS})

