"""docs/reliability.md stays true: its figures equal what the tests try, and every test it names exists."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _section(text: str, title: str) -> str:
    part = text.split(f"## {title}", 1)[1]
    return part.split("\n## ", 1)[0]


def _table_rows(section: str) -> list[list[str]]:
    rows = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]  # skip header and rule


def test_figures_match_the_tests():
    import test_fuzz_config

    text = DOC.read_text()
    figures = {row[0]: int(row[1]) for row in _table_rows(_section(text, "Figures"))}
    faults = _table_rows(_section(text, "Faults"))
    assert figures["config inputs tried per test run (fuzzed flags and YAML files, junk files, command-line mistakes)"] \
        == test_fuzz_config.fuzz_inputs_per_run()
    assert figures["faults tried, each ending in the documented behaviour"] == len(faults)
    assert figures["runs resumed with nothing lost (bitwise-equal weights or the same batches, checked)"] == \
        sum(row[3] == "yes" for row in faults)
    assert f"{len(test_fuzz_config.BAD_FILES)} junk files" in text


def test_every_named_test_exists():
    text = DOC.read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(named) >= 20
    for path, name in named:
        tree = ast.parse((ROOT / path).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in defined, f"{path}::{name} is named in docs/reliability.md but does not exist"
