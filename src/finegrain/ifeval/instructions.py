"""The task's instructions: a subset of IFEval's verifiable instructions, their wording, and their checkers.

IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models", arXiv 2311.07911) pairs a
prompt with instructions whose following a program can verify. This task uses six of its instruction ids:

* **token-local** (a violation sits on identifiable characters, so every token's ground truth is known exactly;
  see :mod:`finegrain.ifeval.truth`):

  - ``punctuation:no_comma`` -- no ``,`` anywhere;
  - ``change_case:english_lowercase`` -- no capital letters (and English, by ``langdetect``);
  - ``change_case:english_capital`` -- no lowercase letters (and English);
  - ``keywords:forbidden_words`` -- none of the given words, as whole words, case-insensitively;

* **content** (carried by every prompt, so that an empty or very short answer cannot pass the token-local ones):

  - ``length_constraints:number_words`` with relation ``at least``;
  - ``keywords:existence`` with the prompt's topic keyword.

The verdicts are IFEval's own checkers from the ``if-verifiable`` package (Google's code, unchanged), called the way
IFEval's evaluation does: ``build_description(**kwargs)`` then ``check_following(response)``; *strict* requires the
response itself to pass, *loose* accepts any of IFEval's eight relaxed variants (first and/or last line removed,
``*`` removed). ``langdetect`` is seeded (``DetectorFactory.seed = 0``) so that the two case checkers give the same
verdict on every call. The prompt wording is ours (:data:`PHRASES`), chosen so that :func:`parse_instructions` can
read the instructions back from a prompt's text -- which is all a reward function receives.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from finegrain.errors import ConfigError, DataError

__all__ = [
    "CONTENT",
    "INSTALL_HINT",
    "INSTRUCTION_IDS",
    "PHRASES",
    "TOKEN_LOCAL",
    "check_instructions",
    "describe",
    "loose_variants",
    "parse_instructions",
    "require_checkers",
]

NO_COMMA = "punctuation:no_comma"
LOWERCASE = "change_case:english_lowercase"
CAPITAL = "change_case:english_capital"
FORBIDDEN = "keywords:forbidden_words"
NUM_WORDS = "length_constraints:number_words"
KEYWORD = "keywords:existence"

TOKEN_LOCAL: tuple[str, ...] = (NO_COMMA, LOWERCASE, CAPITAL, FORBIDDEN)
"""Instruction ids whose violations are located on characters (exact token-level truth)."""

CONTENT: tuple[str, ...] = (NUM_WORDS, KEYWORD)
"""Instruction ids every prompt carries besides its token-local ones."""

INSTRUCTION_IDS: tuple[str, ...] = TOKEN_LOCAL + CONTENT

INSTALL_HINT = "pip install 'finegrain[ifeval]'"

PHRASES: dict[str, str] = {
    NO_COMMA: "Do not use any commas in your response.",
    LOWERCASE: "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
    CAPITAL: "Your entire response should be in English, and in all capital letters.",
    FORBIDDEN: "Do not include the words {words} in your response.",
    NUM_WORDS: "Answer with at least {num_words} words.",
    KEYWORD: 'Include the word "{keyword}" in your response.',
}
"""How each instruction is worded in a prompt (the arguments go in the braces; forbidden words are quoted and
joined with commas and "or")."""


@functools.lru_cache(maxsize=1)
def require_checkers() -> Mapping[str, Any]:
    """IFEval's ``INSTRUCTION_DICT`` (instruction id -> checker class) from ``if-verifiable``.

    Raises:
        ConfigError: ``if-verifiable`` is not installed (naming the command that installs it).
    """
    try:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as exc:
        raise ConfigError(f"the IFEval task needs the 'if-verifiable' package (Python >= 3.11): {INSTALL_HINT} "
                          f"({exc})") from None
    try:
        from langdetect import DetectorFactory

        DetectorFactory.seed = 0  # langdetect samples at random; a fixed seed makes the case checkers repeatable
    except ImportError:  # pragma: no cover - if-verifiable depends on langdetect
        pass
    return INSTRUCTION_DICT


def _quote_words(words: Sequence[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def describe(instruction_id: str, kwargs: Mapping[str, Any]) -> str:
    """The sentence of :data:`PHRASES` for one instruction and its arguments.

    Example:
        >>> describe("keywords:forbidden_words", {"forbidden_words": ["lava", "magma"]})
        'Do not include the words "lava" or "magma" in your response.'
    """
    if instruction_id not in PHRASES:
        raise ConfigError(f"unknown instruction id {instruction_id!r}; this task uses {', '.join(INSTRUCTION_IDS)}")
    if instruction_id == FORBIDDEN:
        return PHRASES[FORBIDDEN].format(words=_quote_words(kwargs["forbidden_words"]))
    if instruction_id == NUM_WORDS:
        return PHRASES[NUM_WORDS].format(num_words=int(kwargs["num_words"]))
    if instruction_id == KEYWORD:
        (keyword,) = kwargs["keywords"]
        return PHRASES[KEYWORD].format(keyword=keyword)
    return PHRASES[instruction_id]


_PARSERS: tuple[tuple[str, re.Pattern], ...] = (
    *((i, re.compile(re.escape(PHRASES[i]))) for i in (NO_COMMA, LOWERCASE, CAPITAL)),
    (FORBIDDEN, re.compile(r"Do not include the words (\"[^\"]+\"(?:(?:, | or )\"[^\"]+\")*) in your response\.")),
    (NUM_WORDS, re.compile(r"Answer with at least (\d+) words\.")),
    (KEYWORD, re.compile(r"Include the word \"([^\"]+)\" in your response\.")),
)


def parse_instructions(text: str, *, source: str | None = None, row: int | None = None) -> tuple[list[str], list[dict]]:
    """Read the instructions back from a prompt's text (the inverse of :func:`describe`).

    Args:
        text: the prompt (the user message).
        source: file name for error messages.
        row: row index for error messages.

    Returns:
        ``(instruction_id_list, kwargs)`` in IFEval's format, in the order the sentences appear.

    Raises:
        DataError: the text carries none of this task's instructions.

    Example:
        >>> parse_instructions('Tell me about tea. Do not use any commas in your response. Include the word "tea" in '
        ...                    'your response.')
        (['punctuation:no_comma', 'keywords:existence'], [{}, {'keywords': ['tea']}])
    """
    found: list[tuple[int, str, dict]] = []
    for instruction_id, pattern in _PARSERS:
        for m in pattern.finditer(text):
            kwargs: dict = {}
            if instruction_id == FORBIDDEN:
                kwargs = {"forbidden_words": re.findall(r"\"([^\"]+)\"", m.group(1))}
            elif instruction_id == NUM_WORDS:
                kwargs = {"num_words": int(m.group(1)), "relation": "at least"}
            elif instruction_id == KEYWORD:
                kwargs = {"keywords": [m.group(1)]}
            found.append((m.start(), instruction_id, kwargs))
    if not found:
        raise DataError("the prompt carries none of the IFEval task's instructions (see docs/ifeval.md for their "
                        f"wording): {text[:120]!r}", source=source, row=row, field="prompt")
    found.sort(key=lambda f: f[0])
    return [f[1] for f in found], [f[2] for f in found]


def loose_variants(response: str) -> list[str]:
    """IFEval's relaxed versions of a response for *loose* accuracy (arXiv 2311.07911, section 2.2).

    The response; without its first line; without its last line; without both; and each of those four with every
    ``*`` removed -- eight texts, as IFEval's ``test_instruction_following_loose`` builds them.
    """
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    plain = [response, first, last, both]
    return plain + [r.replace("*", "") for r in plain]


def check_instructions(response: str, instruction_id_list: Sequence[str], kwargs: Sequence[Mapping[str, Any]],
                       *, loose: bool = False) -> list[bool]:
    """IFEval's verdict on each instruction for one response (strict, or loose over :func:`loose_variants`).

    As IFEval's evaluation: an instruction is followed when ``response.strip()`` is non-empty and the checker
    (built with the instruction's kwargs) accepts the response -- for loose, any non-blank variant.

    Raises:
        ConfigError: an instruction id IFEval does not know, or ``if-verifiable`` missing.
        DataError: kwargs that the checker rejects.

    Example:
        >>> check_instructions("no commas here", ["punctuation:no_comma"], [{}])
        [True]
    """
    registry = require_checkers()
    if len(instruction_id_list) != len(kwargs):
        raise DataError(f"{len(instruction_id_list)} instruction ids but {len(kwargs)} kwargs", field="kwargs")
    texts = loose_variants(response) if loose else [response]
    out = []
    for instruction_id, args in zip(instruction_id_list, kwargs):
        if instruction_id not in registry:
            raise ConfigError(f"unknown IFEval instruction id {instruction_id!r}")
        checker = registry[instruction_id](instruction_id)
        try:
            checker.build_description(**{k: v for k, v in dict(args or {}).items() if v is not None})
        except (TypeError, ValueError) as exc:
            raise DataError(f"instruction {instruction_id}: bad kwargs {dict(args or {})!r}: {exc}",
                            field="kwargs") from None
        out.append(any(t.strip() and bool(checker.check_following(t)) for t in texts))
    return out
