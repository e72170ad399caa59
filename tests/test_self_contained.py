"""The repository stands alone: no shipped text cites a document that lives outside it.

Docstrings, comments and docs cite the paper (authors, year, arXiv id or venue) and the page under ``docs/`` that
writes the formula out. A citation of an outside specification ("spec §2.2", "(spec 3.4)", "ALGORITHMS.md") or a
path into a sibling checkout ("../shared") points at nothing for a reader of the repository, so it fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("src", "docs", "README.md", "CONTRIBUTING.md")

FORBIDDEN = re.compile(
    r"spec\s*§"                            # "spec §2.2", "Spec §1.3"
    r"|ALGORITHMS\.md"                     # the outside specification by name
    r"|\.\./shared"                        # a path out of the repository
    r"|\(spec\s"                           # "(spec 3.4)", "(spec §6)"
    r"|\bspec\s+sections?\b"               # "spec section 6", "spec sections 0, 3.4"
    r"|\bspec\s+\d",                       # "spec 5.4", "spec 3.2-3.3"
    re.IGNORECASE,
)


def offending_lines(root: Path, scanned=SCANNED) -> list[str]:
    """``path:line: text`` for every line under ``scanned`` (relative to ``root``) that matches ``FORBIDDEN``."""
    hits = []
    for name in scanned:
        top = root / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):  # images and other binary files cite nothing
                continue
            for number, line in enumerate(text.splitlines(), 1):
                if FORBIDDEN.search(line):
                    hits.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return hits


def test_no_citation_of_an_outside_document():
    hits = offending_lines(ROOT)
    assert not hits, "cite the paper and a docs/ page instead of an outside document:\n" + "\n".join(hits)


def test_the_scan_covers_the_shipped_text():
    assert (ROOT / "src" / "finegrain").is_dir() and (ROOT / "docs").is_dir()
    assert (ROOT / "README.md").is_file() and (ROOT / "CONTRIBUTING.md").is_file()


@pytest.mark.parametrize("planted", [
    "follows the reconstruction in spec §2.2 (DPO-REG)",
    "TDPO's reference code (Spec §1.3)",
    "the dense reward (spec 6).",
    "TLCR discriminator (spec 3.2-3.3)",
    "(spec sections 0, 3.4, 4.3, 6)",
    "Notation (spec section 0)",
    "see spec/ALGORITHMS.md §4.2",
    "read ../shared/spec/ALGORITHMS.md",
])
def test_the_scan_fires_on_a_planted_citation(tmp_path, planted):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# clean\n", encoding="utf-8")
    (tmp_path / "CONTRIBUTING.md").write_text("clean\n", encoding="utf-8")
    (tmp_path / "docs" / "page.md").write_text("a clean page (Zeng et al., ICML 2024)\n", encoding="utf-8")
    module = tmp_path / "src" / "pkg" / "mod.py"
    module.write_text(f'"""A module."""\n\n\ndef f():\n    """Loss {planted}"""\n', encoding="utf-8")
    assert offending_lines(tmp_path) == [f"src/pkg/mod.py:5: \"\"\"Loss {planted}\"\"\""]


@pytest.mark.parametrize("clean", [
    "a reward spec is one of: DIR, python:module:function",
    "def load_function(spec: str) -> Callable:",
    "source = reward_source(spec, context)",
    "| spec | source |",
    "T-REG (Zhou et al., ACL 2025, arXiv 2412.02685; docs/methods/treg.md)",
])
def test_ordinary_uses_of_the_word_spec_pass(tmp_path, clean):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(clean + "\n", encoding="utf-8")
    assert offending_lines(tmp_path, scanned=("docs",)) == []
