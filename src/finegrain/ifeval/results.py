"""The results table of ``finegrain ifeval run``: every policy's held-out accuracy, KL and length, every source's
token-credit AUROC, the wall times (docs/ifeval.md, "Every method on the real model").

Read from the run directories: ``eval.json`` of each policy (:func:`finegrain.ifeval.evaluate.evaluate_on_task`),
``token-credit/token_credit.json`` (``finegrain eval --token_credit``) and ``times.json``. Written as
``RUN_DIR/results.json`` and a Markdown table ``RUN_DIR/results.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finegrain.ifeval.score import UNASKED

__all__ = ["collect", "format_results", "write_results"]

INSTRUCTION_COLUMNS = (("punctuation:no_comma", "no comma"), ("change_case:english_lowercase", "lowercase"),
                       ("change_case:english_capital", "capitals"), ("keywords:forbidden_words", "forbidden"),
                       ("length_constraints:number_words", "≥N words"), ("keywords:existence", "keyword"))


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(name: str, r: dict, seconds: float | None) -> dict[str, Any]:
    return {"method": name, "n": r["n"], "prompt_strict": r["prompt_strict"],
            "instruction_strict": r["instruction_strict"], "prompt_loose": r["prompt_loose"],
            "instruction_loose": r["instruction_loose"], "kl": r.get("kl"), "mean_words": r["mean_words"],
            "mean_tokens": r["mean_tokens"], "truncated": r["truncated"],
            "per_instruction": {k: v["strict"] for k, v in r["per_instruction"].items()},
            "unasked": {k: v["rate"] for k, v in (r.get("unasked") or {}).items()}, "train_seconds": seconds}


def collect(root: Path, run_dirs: Sequence[Path]) -> dict[str, Any]:
    """Everything the table shows, as one dict (``results.json``)."""
    times = _read(root / "times.json") or {}
    rows = []
    start = _read(root / "start" / "eval.json")
    if start and "prompt_strict" in start:
        rows.append(_row("start", start, None))
    for run in run_dirs:
        r = _read(Path(run) / "eval.json")
        if r and "prompt_strict" in r:
            rows.append(_row(Path(run).name, r, times.get(Path(run).name)))
    reward_models = [{"method": Path(run).name, "train_seconds": times.get(Path(run).name)}
                     for run in run_dirs if Path(run).name.startswith("rm-") and (Path(run) / "final").is_dir()]
    credit = _read(root / "token-credit" / "token_credit.json") or {}
    sources = [{"source": name, "auroc": auc, "precision_at_k": (credit.get("precision_at_k") or {}).get(name)}
               for name, auc in (credit.get("auroc") or {}).items()]
    return {"policies": rows, "reward_models": reward_models, "token_credit": sources,
            "credit_counts": {k: credit.get(k) for k in ("num_responses", "n_pos", "n_neg", "n_neutral")},
            "times": times, "total_seconds": round(sum(times.values()), 1)}


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _t(seconds: Any) -> str:
    if seconds is None:
        return "–"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def format_results(results: dict[str, Any], setting: str = "") -> str:
    """The Markdown tables of ``results`` (policies, then token credit, then times)."""
    rows = results["policies"]
    head = ["method", "prompt strict", "instr. strict", "prompt loose", "KL to start (nats)", "words", "tokens",
            *[c for _, c in INSTRUCTION_COLUMNS], "train time"]
    lines = [f"Held-out test prompts ({rows[0]['n'] if rows else 0}, greedy){' — ' + setting + ' setting' if setting else ''}:",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], _f(r["prompt_strict"]), _f(r["instruction_strict"]), _f(r["prompt_loose"]),
                 _f(r["kl"], 2), _f(r["mean_words"], 1), _f(r["mean_tokens"], 1),
                 *[_f(r["per_instruction"].get(k), 2) for k, _ in INSTRUCTION_COLUMNS], _t(r["train_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("unasked") for r in rows):
        names = [dict(INSTRUCTION_COLUMNS)[k] for k in UNASKED]
        lines += ["", "Followed where the prompt did not ask (the share of responses to prompts without the "
                      "instruction that follow it anyway; a policy that follows instructions, rather than writing one "
                      "way always, stays near the start model):", "",
                  "| method | " + " | ".join(f"{c}, unasked" for c in names) + " |", "|---|" + "---|" * len(names)]
        lines += ["| " + " | ".join([r["method"], *[_f((r.get("unasked") or {}).get(k), 2) for k in UNASKED]]) + " |"
                  for r in rows]
    if results["reward_models"]:
        lines += ["", "Reward models (used by the ppo-rm-* rows): " + ", ".join(
            f"{m['method']} {_t(m['train_seconds'])}" for m in results["reward_models"])]
    if results["token_credit"]:
        c = results["credit_counts"]
        lines += ["", f"Token-credit AUROC against the exact token truth ({c.get('num_responses')} start-model test "
                      f"responses: {c.get('n_neg')} violating, {c.get('n_pos')} clean tokens):", "",
                  "| source | AUROC | precision@k |", "|---|---|---|"]
        lines += [f"| {s['source']} | {_f(s['auroc'])} | {_f(s['precision_at_k'])} |" for s in results["token_credit"]]
    times = results["times"]
    if times:
        lines += ["", f"Wall time of every stage, in all: {_t(results['total_seconds'])} (" +
                  ", ".join(f"{k} {_t(v)}" for k, v in times.items()) + ")"]
    return "\n".join(lines) + "\n"


def write_results(root: Path, run_dirs: Sequence[Path], setting: str = "") -> str:
    """Write ``results.json`` and ``results.md`` into ``root``; returns the Markdown."""
    results = collect(Path(root), run_dirs)
    (Path(root) / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = format_results(results, setting)
    (Path(root) / "results.md").write_text(table)
    return table
