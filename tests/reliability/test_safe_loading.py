"""Safe loading, enforced over the whole package source: any new unsafe call fails this test.

Rules (docs/reliability.md): ``torch.load`` only with ``weights_only=True``; weights as safetensors; no ``eval`` /
``exec`` / ``compile`` of strings, no ``pickle`` / ``marshal`` / ``dill``, no ``yaml.load`` without the safe loader;
no shell commands built from strings (``shell=True``, ``os.system``, ``os.popen``); ``trust_remote_code`` never
switched on in code (a parameter or option may exist, with default ``False``).

The scan parses every ``.py`` file under ``src/finegrain`` (ast, so comments and strings do not count, and
``model.eval()`` is not ``eval``). Each rule is also shown to fire on a snippet that breaks it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "finegrain"
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "dill", "shelve", "cloudpickle"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    """Every breach of the rules above in ``source``, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    found: list[str] = []

    def hit(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in FORBIDDEN_MODULES:
                    hit(node, f"imports {m}")
        if isinstance(node, ast.Call):
            name = _name(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name in FORBIDDEN_CALLS:
                hit(node, f"calls {name}()")
            if name == "torch.load" and not _is_true(kw.get("weights_only")):
                hit(node, "torch.load without weights_only=True")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                loader = _name(kw["Loader"]) if "Loader" in kw else ""
                if not loader.endswith("SafeLoader"):
                    hit(node, f"{name} without SafeLoader (use yaml.safe_load)")
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                hit(node, f"runs a shell command through {name}")
            if _is_true(kw.get("shell")):
                hit(node, f"{name}(shell=True)")
            if _is_true(kw.get("trust_remote_code")):
                hit(node, f"{name}(trust_remote_code=True)")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults) \
                + list(node.args.kw_defaults)
            for a, d in zip(args, defaults):
                if a.arg == "trust_remote_code" and _is_true(d):
                    hit(node, f"{node.name}(trust_remote_code=True by default)")
        if isinstance(node, ast.AnnAssign) and _name(node.target) == "trust_remote_code" and node.value is not None:
            v = node.value
            first = v.args[0] if isinstance(v, ast.Call) and v.args else v
            if _is_true(first):
                hit(node, "trust_remote_code defaults to True")
    return found


def test_the_package_source_has_no_unsafe_loading():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40  # the scan really covers the package
    found = [v for f in files for v in violations(f.read_text(), str(f.relative_to(SRC.parent)))]
    assert not found, "unsafe calls:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "eval('1 + 1')",
    "exec(open('cfg.py').read())",
    "import pickle\npickle.load(open('f', 'rb'))",
    "from pickle import loads",
    "import yaml\nyaml.load(open('c.yaml'))",
    "import os\nos.system('ls ' + path)",
    "import subprocess\nsubprocess.run(cmd, shell=True)",
    "AutoModel.from_pretrained(p, trust_remote_code=True)",
    "def load(p, trust_remote_code=True): ...",
    "class C:\n    trust_remote_code: bool = option(True, 'x')",
])
def test_each_rule_fires(snippet):
    assert violations(snippet)


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)",
    "model.eval()",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "AutoModel.from_pretrained(p, trust_remote_code=cfg.trust_remote_code)",
    "def load(p, *, trust_remote_code=False): ...",
    "import subprocess\nsubprocess.run([sys.executable, '-m', 'x'])",
])
def test_safe_forms_pass(snippet):
    assert violations(snippet) == []


def test_trust_remote_code_is_off_by_default_everywhere():
    from finegrain.config import TrainConfig

    assert TrainConfig().trust_remote_code is False
