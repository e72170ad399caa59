"""Benchmark results as text tables and JSON files.

A result is a dict with ``benchmark``, ``settings``, ``ratios`` (name -> value, each measured side by side in one
run), ``meaning`` (name -> what the ratio divides by what) and ``figures`` (name -> ``{"value", "unit"}``: the
absolute numbers behind the ratios, which depend on the machine and its load).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _number(value: float, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    if unit == "%":
        return f"{100 * value:.1f} %"
    magnitude = abs(value)
    text = (f"{value:.0f}" if magnitude >= 1000 else f"{value:.1f}" if magnitude >= 100 else f"{value:.3g}"
            if magnitude >= 1e-3 or magnitude == 0 else f"{value:.1e}")
    return f"{text} {unit}".rstrip()


def format_table(results: list[dict]) -> str:
    """One aligned table of every result's ratios (marked ``*``) and figures, with its notes below."""
    rows: list[tuple[str, str, str, str]] = []
    notes: list[str] = []
    for result in results:
        if "error" in result:
            rows.append((result.get("benchmark", "?"), "error", "-", result["error"].splitlines()[0]))
            continue
        name = result.get("benchmark", "?")
        rows += [(name, f"* {key}", f"{value:.3f}", result.get("meaning", {}).get(key, ""))
                 for key, value in result.get("ratios", {}).items()]
        rows += [(name, f"  {key}", _number(f["value"], f.get("unit", "")), f.get("note", ""))
                 for key, f in result.get("figures", {}).items()]
        notes += [f"{result['benchmark']}: {n}" for n in result.get("notes", [])]
    header = ("benchmark", "  quantity (* = ratio)", "value", "what it is")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    lines = []
    for i, r in enumerate([header] + rows):
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
        if i == 0:
            lines.append("-" * min(140, sum(widths) + 6 + max(len(x[3]) for x in rows + [header])))
    if notes:
        lines += ["", "notes:"] + [f"  {n}" for n in notes]
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
