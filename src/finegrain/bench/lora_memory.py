"""Peak memory of DPO training with a separate frozen reference model vs LoRA with the reference = the policy with
its adapter disabled.

Three variants of ``finegrain po --loss dpo`` (:func:`finegrain.trainers.po.train`) train the same Llama (random
weights built from a config) on the same synthetic pairs, same batch and steps:

* ``full_copy``: full fine-tuning, the reference a frozen copy of the starting weights (``po``'s default);
* ``lora_copy``: a LoRA adapter (peft, every linear layer), the reference still a separate frozen copy;
* ``lora_shared``: the same LoRA adapter, the reference the policy itself run with its adapter disabled
  (``--use_peft``'s default: no second copy of the weights).

``lora_shared / lora_copy`` isolates what sharing the weights saves: one copy of them, so its share of the peak is
largest where the weights outweigh the activations, as in the default shape and in LoRA fine-tuning of a large model
with modest batches. ``lora_shared / full_copy`` is the whole saving of LoRA against full fine-tuning with a reference
copy. The two LoRA variants compute the same losses (identical reference values), which the result checks.

Each variant runs in a fresh process (:func:`finegrain.bench.measure.run_worker`): tokenizer, data and a tiny
warm-up first, then :class:`finegrain.bench.measure.PeakMemory` measures from before the policy (and the reference
copy where there is one) is built to the last optimizer step, read after every step (the final save is not counted).
What the CPU and CUDA figures count, the default shape and measured figures: docs/benchmarks.md (lora_memory).

Usage::

    finegrain bench lora_memory
    .venv/bin/python bench/lora_memory.py --hidden 256 --layers 2      # smaller
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import statistics
import sys
import tempfile
from pathlib import Path

from finegrain.bench.cli import make_main
from finegrain.bench.synthetic import LLAMA_1B

VARIANTS = ("full_copy", "lora_copy", "lora_shared")
QUICK = dict(hidden=128, layers=2, heads=4, vocab=4000, prompt_len=16, response_len=32, pairs=16, batch=2, steps=2)
GPU = dict(LLAMA_1B.as_dict(), prompt_len=128, response_len=384, pairs=64, batch=4, steps=3, bf16=True)
GPU_QUICK = GPU


def worker(o: dict) -> dict:
    """One variant in this (fresh) process; returns its peak extra memory, step times and losses."""
    from finegrain.bench.measure import PeakMemory, after_optimizer_step, clock, use_device
    from finegrain.bench.synthetic import LlamaShape, build_model, word_tokenizer
    from finegrain.data.loading import load_rows
    from finegrain.data.prepared import PreferenceData
    from finegrain.data.tokenize import TokenLimits
    from finegrain.trainers import po

    shape = LlamaShape(**o["shape"])
    max_length = o["prompt_len"] + o["response_len"] + 4
    tokenizer = word_tokenizer(shape.vocab)
    data = PreferenceData.from_source(load_rows(o["data"], None), tokenizer,
                                      limits=TokenLimits(max_length=max_length, max_prompt_length=o["prompt_len"] + 2))
    lora = o["variant"] != "full_copy"
    cfg = po.POConfig(
        loss="dpo", beta=0.1, use_peft=lora, lora_r=o["lora_r"], lora_alpha=2 * o["lora_r"],
        per_device_train_batch_size=o["batch"], max_length=max_length, max_prompt_length=o["prompt_len"] + 2,
        max_steps=o["steps"], learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=10**6, save_steps=0,
        output_dir=o["out"], overwrite_output_dir=True, disable_tqdm=True, seed=0, bf16=o["bf16"],
    )
    # warm-up: the same training on a tiny model first, so that imports (peft, accelerate), thread pools and
    # kernels' one-off buffers are not counted
    tiny = LlamaShape(hidden=16, layers=1, heads=2, vocab=shape.vocab)
    with use_device(o["device"]):
        po.train(dataclasses.replace(cfg, max_steps=1, output_dir=o["out"] + "-warmup"), build_model(tiny, max_length + 4),
                 tokenizer, data, ref_model=build_model(tiny, max_length + 4) if o["variant"] == "lora_copy" else None)
    gc.collect()
    peak = PeakMemory(o["device"]).start()
    model = build_model(shape, max_length + 4)
    params = sum(p.numel() for p in model.parameters())
    ref = copy.deepcopy(model) if o["variant"] == "lora_copy" else None  # full_copy: po.train makes the copy
    peaks, ends, losses = [], [], []

    def measured(*args):
        peaks.append(peak.read())
        ends.append(clock(o["device"])[0])
        losses.append(float(args[-1]))

    with use_device(o["device"]), after_optimizer_step(measured):
        po.train(cfg, model, tokenizer, data, ref_model=ref)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"peak_extra_mib": max(peaks), "method": peak.method, "losses": losses,
            "step_s": statistics.median([b - a for a, b in zip(ends, ends[1:])]) if len(ends) > 1 else None,
            "params": params, "trainable_params": trainable}


def run(*, hidden: int = 768, layers: int = 8, heads: int = 12, kv_heads: int | None = None,
        intermediate: int | None = None, vocab: int = 8000, tie_embeddings: bool = True, prompt_len: int = 32,
        response_len: int = 64, pairs: int = 32, batch: int = 2, steps: int = 3, lora_r: int = 16,
        threads: int | None = None, device: str = "cpu", bf16: bool = False) -> dict:
    """Run the three variants in fresh processes; returns the result dict (``ratios`` of peak memory)."""
    from finegrain.bench.measure import run_worker
    from finegrain.bench.synthetic import LlamaShape, random_pairs
    from finegrain.data.files import write_jsonl

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    shape = LlamaShape(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                       vocab=vocab, tie_embeddings=tie_embeddings)
    settings = dict(shape=shape.as_dict(), prompt_len=prompt_len, response_len=response_len, batch=batch,
                    steps=steps, lora_r=lora_r, threads=threads, device=device, bf16=bf16)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(Path(tmp) / "pairs.jsonl", random_pairs(pairs, vocab, prompt_len, response_len))
        for variant in VARIANTS:
            res[variant] = run_worker("finegrain.bench.lora_memory", {**settings, "variant": variant, "data": str(data),
                                                                      "out": str(Path(tmp) / variant)})
            print(f"  lora_memory {variant:<12} peak {res[variant]['peak_extra_mib']:.1f} MiB", file=sys.stderr,
                  flush=True)
    loss_gap = max(abs(a - b) for a, b in zip(res["lora_copy"]["losses"], res["lora_shared"]["losses"]))
    mib = {v: res[v]["peak_extra_mib"] for v in VARIANTS}
    figures = {f"{v}_peak_mib": {"value": mib[v], "unit": "MiB"} for v in VARIANTS}
    figures["policy_weights_mib"] = {"value": res["full_copy"]["params"] * 4 / 2**20, "unit": "MiB",
                                     "note": "size of one copy of the weights (float32), for scale"}
    figures["reference_copy_mib"] = {"value": mib["lora_copy"] - mib["lora_shared"], "unit": "MiB",
                                     "note": "lora_copy - lora_shared: what the second copy cost (compare the weights)"}
    figures["lora_trainable_params"] = {"value": res["lora_shared"]["trainable_params"], "unit": "",
                                        "note": f"of {res['lora_shared']['params']} parameters (rank {lora_r})"}
    figures["lora_loss_difference"] = {"value": loss_gap, "unit": "",
                                       "note": "max |loss(lora_copy) - loss(lora_shared)| over the steps (same maths)"}
    return {
        "benchmark": "lora_memory", "settings": settings, "memory_method": res["full_copy"]["method"],
        "ratios": {"lora_shared/lora_copy": mib["lora_shared"] / mib["lora_copy"],
                   "lora_shared/full_copy": mib["lora_shared"] / mib["full_copy"]},
        "meaning": {"lora_shared/lora_copy": "peak memory of LoRA DPO: reference = policy with adapter disabled / "
                                             "a separate frozen reference copy",
                    "lora_shared/full_copy": "peak memory: LoRA with the shared reference / full fine-tuning with a "
                                             "reference copy"},
        "figures": figures, "variants": res,
        "notes": [f"memory: {res['full_copy']['method']}"],
    }


main = make_main(run, __doc__, help={"bf16": "bfloat16 mixed precision"})

