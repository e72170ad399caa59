"""Imports run one way: every finegrain import (function-level ones included) goes to a lower layer or stays
inside its own package, no generic package imports an application (the built-in world, the real-model task), and
no modules import each other in a circle.

Layers, from the ground up (CONTRIBUTING.md, "Layout and layering"):

    0  errors, types, lazy, the package itself
    1  ops, config
    2  data, losses
    3  models
    4  rewards
    5  rl
    6  eval
    7  trainers, report, labeling                 (the library ends here)
    8  world, ifeval                              (applications on top of the library; they never import each other)
    9  bench
    10 cli
    11 demo, __main__
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "finegrain"

LAYERS = {
    "": 0, "errors": 0, "types": 0, "lazy": 0,
    "ops": 1, "config": 1,
    "data": 2, "losses": 2,
    "models": 3,
    "rewards": 4,
    "rl": 5,
    "eval": 6,
    "trainers": 7, "report": 7, "labeling": 7,
    "world": 8, "ifeval": 8,
    "bench": 9,
    "cli": 10,
    "demo": 11, "__main__": 11,
}
APPLICATIONS = {"world", "ifeval"}


def _part(module: str) -> str:
    """``finegrain.rewards.base`` -> ``rewards``; ``finegrain`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imported(tree: ast.AST, here: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every finegrain import in ``tree`` at any depth (relative ones resolved)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "finegrain"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: -node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "finegrain":
                # "from finegrain import world" names a package, not an attribute
                names = [f"{module}.{a.name}" for a in node.names] if module == "finegrain" else [module]
                out += [(node.lineno, m) for m in names]
    return out


def violations(sources: dict[str, str]) -> list[str]:
    """Every import that breaks the layering, as ``file:line: a -> b (why)``.

    Args:
        sources: dotted module name (``finegrain.rewards.base``) -> its source text.
    """
    found = []
    for module, text in sorted(sources.items()):
        here = _part(module)
        if here not in LAYERS:
            found.append(f"{module}: package '{here}' has no layer; add it to LAYERS in tests/test_layering.py")
            continue
        for line, target in _imported(ast.parse(text), module):
            there = _part(target)
            if there not in LAYERS:
                continue  # a module of the package root (finegrain.__version__) or a name that does not exist
            if there == here:
                continue
            if there in APPLICATIONS and here in APPLICATIONS:
                found.append(f"{module}:{line}: {here} -> {there} (applications never import each other)")
            elif LAYERS[there] >= LAYERS[here]:
                why = "a generic package imports an application" if there in APPLICATIONS else "an upward import"
                found.append(f"{module}:{line}: {here} -> {there} ({why})")
    return found


def circles(sources: dict[str, str]) -> list[list[str]]:
    """Every import circle between modules (function-level imports included), as sorted module lists: the strongly
    connected components of more than one module (Tarjan). An import of a name resolves to the longest module
    prefix that exists (``from finegrain.data import files`` -> ``finegrain.data.files`` when that module exists,
    else the package ``finegrain.data``)."""
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, text in sources.items():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module and node.module in sources:
                targets = [f"{node.module}.{a.name}" for a in node.names]  # submodules named by "from pkg import"
                graph[module] |= {t for t in targets if t in sources and t != module}
        for _, target in _imported(tree, module):
            while target and target not in sources:
                target = target.rpartition(".")[0]
            if target and target != module:
                graph[module].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_sources() -> dict[str, str]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path.read_text()
    return out


def test_the_package_imports_run_one_way():
    sources = _package_sources()
    assert len(sources) > 80
    assert violations(sources) == []


def test_no_import_circles():
    """No two modules import each other, directly or through others (a split file imports its config from a lower
    module, as ``trainers/po_config.py`` does for ``po.py``)."""
    assert circles(_package_sources()) == []


def test_planted_circles_are_found():
    planted = {
        "finegrain.trainers.po": "from finegrain.trainers.po_stats import accumulate\n",
        "finegrain.trainers.po_stats": "def f():\n    from finegrain.trainers import po\n",
        "finegrain.trainers": "",
        "finegrain.rewards.base": "from finegrain.ops.masked import zero_masked\n",
        "finegrain.ops.masked": "",
    }
    assert circles(planted) == [["finegrain.trainers.po", "finegrain.trainers.po_stats"]]


def test_planted_violations_are_found():
    """The check fires on a function-level import of the world from a trainer, an upward import, and an application
    importing another; it stays quiet on downward and same-package imports."""
    planted = {
        "finegrain.trainers.po": "def load():\n    from finegrain.world import ensure_world\n",
        "finegrain.models.reward_model": "from finegrain.rewards.placement import place_on_last_token\n",
        "finegrain.ifeval.cli": "import finegrain.world.app\n",
        "finegrain.rewards.base": "from finegrain.ops import masked_sum\nfrom . import placement\n",
        "finegrain.eval.cli": "from finegrain import world\n",
    }
    found = violations(planted)
    assert any("trainers.po:2: trainers -> world (a generic package imports an application)" in f for f in found)
    assert any("models.reward_model:1: models -> rewards (an upward import)" in f for f in found)
    assert any("ifeval.cli:1: ifeval -> world (applications never import each other)" in f for f in found)
    assert any("eval.cli:1: eval -> world" in f for f in found)
    assert not any("rewards.base" in f for f in found)
    assert len(found) == 4
