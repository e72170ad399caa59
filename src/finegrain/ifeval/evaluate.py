"""A policy on the task's held-out prompts: ``finegrain eval`` with the IFEval judge, plus IFEval's own accuracies.

:func:`evaluate_on_task` is the library's evaluation (:func:`finegrain.eval.cli.evaluate_policy`, what ``finegrain
eval --judge ifeval`` runs): the policy and the reference (the start model) decode the test prompts greedily, the
``ifeval`` source judges every response (``prompt_strict_rate`` ...), and the policy's responses give the sequential
KL ``Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t))`` over the full vocabulary. It then scores both sides' responses with
:func:`finegrain.ifeval.score.score_responses` -- IFEval's pooled accuracies (Zhou et al. 2023, arXiv 2311.07911,
section 2.2), loose variants, per-instruction accuracy, length in words -- and writes everything into one
``eval.json`` next to the library's ``samples.jsonl`` (docs/ifeval.md, "How it is scored"):

* the library's keys (``seq_kl``, ``length``, ``win_rate``, ``prompt_strict_rate``, ``ref_...``; docs/evaluation.md);
* IFEval's keys of the policy: ``n``, ``prompt_strict``, ``instruction_strict``, ``prompt_loose``,
  ``instruction_loose``, ``mean_words``, ``per_instruction``, ``unasked``, ``mean_tokens`` (EOS included),
  ``truncated`` (the share cut at ``max_new_tokens``), ``kl`` (= ``seq_kl``; None when there is no reference);
* ``reference_ifeval``: the same IFEval keys of the reference's responses (the start model's row, for free);
* the settings ``decoding``, ``max_new_tokens``, ``dtype``, ``seconds``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finegrain.data.files import read_jsonl, write_text
from finegrain.errors import ConfigError

__all__ = ["IFEVAL_KEYS", "check_eval_settings", "evaluate_on_task", "format_eval", "rescore",
           "samples_as_task_rows"]

IFEVAL_KEYS = ("n", "prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose", "mean_words",
               "per_instruction", "unasked", "mean_tokens", "truncated")


def _ifeval_scores(rows: Sequence[dict], samples: Sequence[dict], side: str, source: str) -> dict[str, Any]:
    from finegrain.ifeval.score import score_responses

    responses = [s[side] for s in samples]
    scores = vars(score_responses(rows, responses, source=source))
    length_key = "length" if side == "response" else "ref_length"
    cut_key = "truncated" if side == "response" else "ref_truncated"
    return {**{k: scores[k] for k in IFEVAL_KEYS if k in scores},
            "mean_tokens": sum(s[length_key] for s in samples) / len(samples),
            "truncated": sum(bool(s[cut_key]) for s in samples) / len(samples)}


def _check_order(rows: Sequence[dict], samples: Sequence[dict], source: str) -> None:
    from finegrain.errors import DataError

    if len(rows) != len(samples):
        raise DataError(f"{len(samples)} evaluated responses for {len(rows)} test prompts", source=source)
    for i, (row, sample) in enumerate(zip(rows, samples)):
        if sample.get("prompt") != row["prompt"]:
            raise DataError("the evaluated prompt is not the test prompt of this row", source=source, row=i,
                            field="prompt")


def samples_as_task_rows(rows: Sequence[dict], samples_path: Path) -> list[dict]:
    """The responses of an evaluation's ``samples.jsonl`` joined with the task's test rows, in the task's sample
    layout (each test row plus ``responses``: a list of one text), what :func:`finegrain.ifeval.data.make_truth`
    reads. A ``samples.jsonl`` already in that layout (rows with ``responses``) is returned as it is."""
    samples = read_jsonl(samples_path)
    if samples and "responses" in samples[0]:
        return samples
    rows = list(rows)[: len(samples)]
    _check_order(rows, samples, str(samples_path))
    return [dict(row, responses=[s["response"]]) for row, s in zip(rows, samples)]


def evaluate_on_task(policy: str | Path, rows: Sequence[dict], prompts_path: str | Path, out_dir: str | Path, *,
                     reference: str | Path | None, max_new_tokens: int, dtype: str, batch_size: int = 64,
                     device: Any = None, models: Any = None, show_progress: bool = False) -> dict[str, Any]:
    """Evaluate ``policy`` on the first ``len(rows)`` prompts of ``prompts_path`` (module docstring).

    Args:
        policy: the policy's model directory (``RUN/final``, or ``RUN``).
        rows: the task's test rows (``prompt``, ``instruction_id_list``, ``kwargs``), in file order.
        prompts_path: the file ``rows`` come from (what ``finegrain eval --prompts`` reads).
        out_dir: where ``eval.json`` and ``samples.jsonl`` go (a policy's run directory, or the task's
            ``eval/NAME``).
        reference: the reference model directory (the start model); None: the policy is its own reference and
            ``kl`` is None.
        max_new_tokens: the most tokens per response.
        dtype: the dtype both models decode in.
        batch_size: responses per sampling batch.
        device: where the models run (None: CUDA when available).
        models: a :class:`finegrain.models.loading.ModelCache` shared between calls, so that the reference's
            responses are sampled once for several policies.
        show_progress: show progress bars.

    Returns:
        The content of ``eval.json``.
    """
    from finegrain.eval.cli import evaluate_policy
    from finegrain.ifeval.sources import register

    register()
    out = Path(out_dir)
    start = time.perf_counter()
    result = evaluate_policy(policy, reference if reference is not None else policy, prompts=str(prompts_path),
                             judge="ifeval", temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             max_prompts=len(rows), output_dir=out, device=device, dtype=dtype, models=models,
                             disable_tqdm=not show_progress)
    seconds = time.perf_counter() - start
    result = _with_ifeval_scores(result, rows, out)
    result["kl"] = result.get("seq_kl") if reference is not None else None
    result.update(decoding="greedy", max_new_tokens=max_new_tokens, dtype=dtype, seconds=round(seconds, 1))
    write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
    return result


def _with_ifeval_scores(result: dict[str, Any], rows: Sequence[dict], out: Path) -> dict[str, Any]:
    """``result`` plus IFEval's keys of both sides, scored from ``out/samples.jsonl``."""
    samples_path = out / "samples.jsonl"
    samples = read_jsonl(samples_path)
    _check_order(rows, samples, str(samples_path))
    result.update(_ifeval_scores(rows, samples, "response", str(samples_path)))
    result["reference_ifeval"] = _ifeval_scores(rows, samples, "ref_response", str(samples_path))
    return result


def rescore(out_dir: str | Path, rows: Sequence[dict]) -> dict[str, Any]:
    """Re-score an existing evaluation's responses (``out_dir/samples.jsonl``) with the current IFEval keys and
    rewrite its ``eval.json``; nothing is sampled again. How an ``eval.json`` written before a key existed (such
    as ``unasked``) gets it."""
    out = Path(out_dir)
    result = _with_ifeval_scores(json.loads((out / "eval.json").read_text()), rows, out)
    write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
    return result


def check_eval_settings(path: Path, asked: dict[str, Any]) -> dict[str, Any]:
    """The eval.json at ``path``, refused when it was made with other settings than ``asked``."""
    old = json.loads(path.read_text())
    differ = {k: (old.get(k), v) for k, v in asked.items() if old.get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        raise ConfigError(f"{path} holds an evaluation with other settings ({detail}); pass --name to keep both, "
                          "or delete that directory")
    return old


def format_eval(name: str, r: dict) -> str:
    """A short table of an eval.json."""
    kl = f", KL to reference {r['kl']:.2f} nats" if r.get("kl") is not None else ""
    lines = [f"  {name}: {r['n']} test prompts (greedy, {r['dtype']}, {r['seconds']} s)",
             f"    prompt-level strict {r['prompt_strict']:.3f} (loose {r['prompt_loose']:.3f}), instruction-level "
             f"strict {r['instruction_strict']:.3f} (loose {r['instruction_loose']:.3f})",
             f"    mean length {r['mean_words']:.1f} words / {r['mean_tokens']:.1f} tokens, "
             f"{100 * r['truncated']:.0f}% cut at max_new_tokens{kl}",
             "    per instruction (strict): " + ", ".join(f"{k.split(':')[1]} {v['strict']:.2f} (n={v['count']})"
                                                    for k, v in r["per_instruction"].items())]
    return "\n".join(lines)
