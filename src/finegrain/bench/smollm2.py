"""Every speed and memory benchmark on a real model, side by side in one run: SmolLM2-135M-Instruct.

The model is the SmolLM2-135M-Instruct that the real-model task converts offline (docs/ifeval.md:
``<cache>/models/SmolLM2-135M-Instruct``, found with :func:`finegrain.ifeval.model.is_model_ready`; nothing is
downloaded here), or, when it is absent (tests, CI), the same architecture from a config with random weights
(:data:`finegrain.bench.synthetic.SMOLLM2_135M`: hidden 576, 30 layers, 9 heads, 3 key/value heads, MLP 1536,
vocabulary 49,152, tied embeddings) and the word tokenizer. Speed does not depend on the weights' values, so the two
give the same step times; the result names which one ran (``settings.model_source``). The parts, in order:

1. ``roofline``: the FLOP/s of a plain float32 matmul (:func:`finegrain.bench.measure.matmul_flops_per_s`, the
   same thread count), measured before and after the training steps; the best is the peak.
2. ``po``: :mod:`finegrain.bench.po_vs_trl` on the model: ``finegrain po`` DPO vs TRL's ``DPOTrainer``, full
   fine-tuning and LoRA (same adapter in both), and TDPO2 vs DPO, interleaved round by round; then one profiled
   step of each configuration in ``profile`` (:mod:`finegrain.bench.profiling`). Each step's model FLOPs
   (:mod:`finegrain.models.flops`) over its time, as a fraction of the matmul peak, is the roofline line.
3. ``tdpo_memory``: :mod:`finegrain.bench.tdpo_memory` at the model's vocabulary and hidden size (random states and
   head of that shape: memory does not depend on the values), ``mem_rows`` x ``mem_seq_len`` tokens.
4. ``rollout``: :mod:`finegrain.bench.rollout_throughput` with the model: finegrain's sampler vs ``generate``.
5. ``ppo``: :mod:`finegrain.bench.ppo_breakdown` with the model as policy (LoRA off, a separate critic, a cheap
   Python reward): the share of a PPO step spent generating, scoring and training.

Every time is taken both by the wall clock and as the process's CPU time: the benchmark runs one torch thread per
process on a machine other jobs share, where a one-thread process's CPU time leaves out the time it waited for a
core. Ratios are given for both; the fractions of the matmul peak use CPU time for the step and for the peak
alike (``wall:`` ones use wall-clock time for both, measured minutes apart). The issue's targets are quoted in
``targets`` for context, never used to fail the run.

Usage::

    finegrain bench smollm2 --threads 1                         # bench/results/smollm2.json (about 40 minutes)
    .venv/bin/python bench/smollm2.py --parts po --rounds 1     # one part, every size as an option
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

from finegrain.bench.cli import make_main

PARTS = ("roofline", "po", "tdpo_memory", "rollout", "ppo")
PO_CONFIGS = ("finegrain-dpo", "trl-dpo", "finegrain-dpo-lora", "trl-dpo-lora", "finegrain-tdpo2")
QUICK = dict(model="config", layers=2, prompt_len=8, response_len=16, pairs=8, batch=1, steps=3, warmup=1, rounds=1,
             profile=("finegrain-dpo",), mem_rows=2, mem_seq_len=64, mem_chunk_size=64, rollout_batch=4, min_prompt=4,
             max_prompt=8, new_tokens=8, repeats=2, ppo_steps=2, ppo_rollout_batch=4, ppo_new_tokens=8, ppo_epochs=1,
             ppo_micro_batch=4, matmul_size=256)
GPU = dict(bf16=True, batch=8, prompt_len=128, response_len=384, pairs=128, steps=6, warmup=2, mem_seq_len=2048,
           mem_chunk_size=2048, rollout_batch=64, min_prompt=64, max_prompt=128, new_tokens=256, ppo_rollout_batch=64,
           ppo_new_tokens=128, ppo_micro_batch=16, matmul_size=8192)
GPU_QUICK = dict(GPU, steps=4, warmup=1, rounds=1, repeats=2, ppo_steps=2, profile=())
# The targets for the ratios of this benchmark (issue 16), quoted in the result for context.
TARGETS = {
    "finegrain_dpo/trl_dpo": ("<=", 0.9), "finegrain_dpo_lora/trl_dpo_lora": ("<=", 0.9),
    "finegrain_tdpo2/finegrain_dpo": ("<=", 1.15), "chunked/naive_peak_memory": ("<=", 0.25),
    "sampler/generate_tok_s": (">=", 0.95), "finegrain-dpo/matmul_peak": (">=", 0.40),
}


def resolve_model(model: str, root: Path, layers: int | None = None) -> tuple[str, str]:
    """``(model directory, source)`` for ``model``: ``"real"`` (the converted SmolLM2-135M-Instruct; an error when
    it is absent), ``"config"`` (SmolLM2's architecture with random weights, ``layers`` layers if given, saved with
    the word tokenizer under ``root``), ``"auto"`` (real when present and ``layers`` is None, else config) or a
    model directory."""
    from finegrain.ifeval.model import is_model_ready, model_dir

    if model == "auto":
        model = "real" if layers is None and is_model_ready() else "config"
    if model == "real":
        if layers is not None:
            raise ValueError("layers applies to model='config' only (the real model has 30)")
        if not is_model_ready():
            raise ValueError(f"SmolLM2-135M-Instruct is not converted in {model_dir()}; run 'finegrain ifeval build "
                             "--stages model' (docs/ifeval.md) or use model='config'")
        return str(model_dir()), "SmolLM2-135M-Instruct (converted offline, docs/ifeval.md)"
    if model == "config":
        import dataclasses

        from finegrain.bench.synthetic import SMOLLM2_135M, build_model, word_tokenizer

        shape = SMOLLM2_135M if layers is None else dataclasses.replace(SMOLLM2_135M, layers=layers)
        out = root / "model"
        build_model(shape, 2048).save_pretrained(out)
        word_tokenizer(shape.vocab).save_pretrained(out)
        return str(out), f"SmolLM2-135M's architecture from a config, random weights ({shape.layers} layers)"
    if not Path(model).is_dir():
        raise ValueError(f"model must be 'auto', 'real', 'config' or a model directory; got {model!r}")
    return model, f"model directory {model}"


def _profile_lines(profiles: dict, cpu_peak: float | None) -> dict:
    """Per profiled configuration: the shares of its step by kind of work and its matmuls' rate vs the peak."""
    out = {}
    for name, p in profiles.items():
        row = {"share": p["share"], "matmul_flops": p["matmul_flops"], "top_ops": p["top_ops"][:8]}
        if p.get("step_cpu_s") and p["matmul_flops"]:
            # the profiler's times are wall-clock; scaled by the step's CPU / wall time, they estimate CPU time
            cpu_matmul_s = p["share"]["matmul"] * p["step_cpu_s"]
            row["matmul_cpu_flops_per_s"] = p["matmul_flops"] / cpu_matmul_s if cpu_matmul_s else None
            if cpu_peak and row["matmul_cpu_flops_per_s"]:
                row["matmul_of_peak"] = row["matmul_cpu_flops_per_s"] / cpu_peak
        out[name] = row
    return out


def run(*, model: str = "auto", layers: int | None = None, parts: tuple[str, ...] | list[str] = PARTS,
        prompt_len: int = 64, response_len: int = 128, pairs: int = 32, batch: int = 2, steps: int = 4,
        warmup: int = 1, rounds: int = 2, lora_r: int = 16, configs: tuple[str, ...] | list[str] = PO_CONFIGS,
        profile: tuple[str, ...] | list[str] = ("finegrain-dpo", "trl-dpo"), mem_rows: int = 4,
        mem_seq_len: int = 512, mem_chunk_size: int = 1024, rollout_batch: int = 8, min_prompt: int = 16,
        max_prompt: int = 64, new_tokens: int = 64, repeats: int = 5, ppo_steps: int = 4, ppo_warmup: int = 1,
        ppo_rollout_batch: int = 8, ppo_new_tokens: int = 32, ppo_epochs: int = 2, ppo_micro_batch: int = 4,
        matmul_size: int = 2048, threads: int | None = None, device: str = "cpu", bf16: bool = False,
        workdir: str | None = None) -> dict:
    """Run the parts (see the module docstring) and return one result dict: ``ratios`` (wall-clock time),
    ``cpu_time_ratios``, ``figures``, ``targets``, and each part's own result under ``parts``."""
    import torch
    from transformers import AutoConfig

    from finegrain.bench import po_vs_trl, ppo_breakdown, rollout_throughput, tdpo_memory
    from finegrain.bench.measure import matmul_flops_per_s

    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {list(PARTS)}")
    if threads:
        torch.set_num_threads(threads)
    results: dict = {}
    errors: dict[str, str] = {}
    ratios: dict[str, float] = {}
    meaning: dict[str, str] = {}
    cpu_ratios: dict[str, float] = {}
    figures: dict = {}
    notes: list[str] = []
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        model_dir, source = resolve_model(model, Path(tmp), layers)
        c = AutoConfig.from_pretrained(model_dir)
        settings = dict(model=model_dir, model_source=source, hidden=c.hidden_size, layers=c.num_hidden_layers,
                        heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                        intermediate=c.intermediate_size, vocab=c.vocab_size, tie_embeddings=c.tie_word_embeddings,
                        parts=list(parts), threads=torch.get_num_threads(), device=device, bf16=bf16)
        print(f"  smollm2: {source}", file=sys.stderr, flush=True)
        peaks = []
        if "roofline" in parts:
            peaks.append(matmul_flops_per_s(matmul_size, matmul_size, matmul_size, device=device))

        def part(name: str, fn):
            """``fn()`` into ``results[name]`` when ``name`` is selected; a failure goes to ``errors`` (and is
            printed): one part failing must not lose the others' results."""
            if name in parts:
                try:
                    results[name] = fn()
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    print(f"  smollm2: part {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            return results.get(name)

        po = part("po", lambda: po_vs_trl.run(
            model=model_dir, configs=configs, profile=profile, prompt_len=prompt_len, response_len=response_len,
            pairs=pairs, batch=batch, steps=steps, warmup=warmup, rounds=rounds, lora_r=lora_r, device=device,
            bf16=bf16, workdir=workdir))
        if po is not None:
            for key in ("finegrain_dpo/trl_dpo", "finegrain_dpo_lora/trl_dpo_lora", "finegrain_tdpo2/finegrain_dpo"):
                if key in po["ratios"]:
                    ratios[key] = po["ratios"][key]
                    meaning[key] = po["meaning"][key]
                    cpu_ratios[key] = po["cpu_time"]["ratios"][key]
            for name, seconds in po["median_step_s"].items():
                figures[f"{name}_s_per_step"] = {"value": seconds, "unit": "s",
                                                 "note": f"CPU {po['cpu_time']['median_step_s'][name]:.1f} s"}
            figures["pair_tokens"] = {"value": po["throughput"]["mean_pair_tokens"], "unit": "tokens",
                                      "note": f"prompt twice + chosen + rejected, mean; {batch} pairs per step"}
        if "roofline" in parts:
            peaks.append(matmul_flops_per_s(matmul_size, matmul_size, matmul_size, device=device))
            best = max(peaks, key=lambda p: p["cpu_flops_per_s"])
            wall_best = max(p["flops_per_s"] for p in peaks)
            results["roofline"] = {"probes": peaks, "cpu_flops_per_s": best["cpu_flops_per_s"],
                                   "flops_per_s": wall_best}
            figures["matmul_peak_gflops"] = {"value": best["cpu_flops_per_s"] / 1e9, "unit": "GFLOP/s",
                                             "note": f"float32 {matmul_size}^3 matmul, {best['threads']} thread(s), "
                                                     f"CPU time (wall clock: {wall_best / 1e9:.1f})"}
            if po is not None:
                for name, t in po["cpu_time"]["throughput"].items():
                    if not isinstance(t, dict):
                        continue
                    key = f"{name}/matmul_peak"
                    ratios[key] = t["achieved_flops_per_s"] / best["cpu_flops_per_s"]
                    meaning[key] = (f"{name}: model FLOPs per step / CPU seconds per step, as a fraction of the "
                                    "matmul peak (CPU time)")
                    wall = po["throughput"][name]["achieved_flops_per_s"] / wall_best
                    figures[f"{name}_gflops"] = {"value": t["achieved_flops_per_s"] / 1e9, "unit": "GFLOP/s",
                                                 "note": f"model FLOPs / CPU time; wall clock: {wall:.1%} of the "
                                                         "wall-clock matmul peak"}
                results["profiles"] = _profile_lines(po.get("profiles", {}), best["cpu_flops_per_s"])
        mem = part("tdpo_memory", lambda: tdpo_memory.run(
            rows=mem_rows, seq_len=mem_seq_len, vocab=c.vocab_size, hidden=c.hidden_size, chunk_size=mem_chunk_size,
            threads=threads, device=device, dtype="bfloat16" if bf16 else "float32"))
        if mem is not None:
            ratios["chunked/naive_peak_memory"] = mem["ratios"]["chunked/naive_peak_memory"]
            meaning["chunked/naive_peak_memory"] = (f"peak memory of TDPO statistics + loss, forward + backward, "
                                                    f"{mem_rows} x {mem_seq_len} tokens, V = {c.vocab_size}: chunked "
                                                    f"({mem_chunk_size} rows) / full logits")
            for k in ("chunked_peak_mib", "naive_peak_mib", "worst_relative_difference"):
                figures[f"tdpo_{k}"] = mem["figures"][k]
        ro = part("rollout", lambda: rollout_throughput.run(
            model=model_dir, batch=rollout_batch, min_prompt=min_prompt, max_prompt=max_prompt, new_tokens=new_tokens,
            repeats=repeats, threads=threads, device=device, dtype="bfloat16" if bf16 else "float32"))
        if ro is not None:
            ratios["sampler/generate_tok_s"] = ro["ratios"]["finegrain/transformers_tok_s"]
            meaning["sampler/generate_tok_s"] = (f"rollout tokens/s, {rollout_batch} prompts x {new_tokens} new "
                                                 "tokens: finegrain's sampler / generate (median of repetitions)")
            cpu_ratios["sampler/generate_tok_s"] = ro["cpu_time"]["ratio"]
            for k in ("finegrain_tok_s", "transformers_tok_s", "identical_samples", "tokens_per_row"):
                figures[f"rollout_{k}"] = ro["figures"][k]
        ppo = part("ppo", lambda: ppo_breakdown.run(
            model=model_dir, steps=ppo_steps, warmup=ppo_warmup, rollout_batch_size=ppo_rollout_batch,
            max_new_tokens=ppo_new_tokens, ppo_epochs=ppo_epochs, micro_batch=ppo_micro_batch,
            prompt_len=prompt_len // 2, throughput_repeats=0, threads=threads, device=device, bf16=bf16))
        if ppo is not None:
            for phase in ppo_breakdown.PHASES:
                ratios[f"{phase}/ppo_step"] = ppo["ratios"][f"{phase}/step"]
                meaning[f"{phase}/ppo_step"] = ppo["meaning"][f"{phase}/step"]
            figures["ppo_step_s"] = ppo["figures"]["step_s"]
            figures["ppo_response_length"] = ppo["figures"]["response_length"]
    targets = {}
    for key, (op, value) in TARGETS.items():
        if key in ratios:
            met = ratios[key] <= value if op == "<=" else ratios[key] >= value
            targets[key] = {"target": f"{op} {value}", "measured": ratios[key], "met": met,
                            "cpu_time": cpu_ratios.get(key)}
            notes.append(f"{key} = {ratios[key]:.3f}" + (f" (CPU time {cpu_ratios[key]:.3f})" if key in cpu_ratios
                                                         else "") + f"; issue 16 target {op} {value}")
    notes += [f"part {k} failed: {v}" for k, v in errors.items()]
    if errors and not results:
        raise RuntimeError("every part failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    return {"benchmark": "smollm2", "settings": settings, "ratios": ratios, "meaning": meaning,
            "cpu_time_ratios": cpu_ratios, "figures": figures, "targets": targets, "parts": results,
            "errors": errors, "notes": notes}


main = make_main(run, __doc__, choices={"parts": PARTS},
                 help={"model": "auto | real | config | a model directory",
                       "layers": "layers of the config model (default: SmolLM2's 30)"})

