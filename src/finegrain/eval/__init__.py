"""Evaluation: metric functions (``finegrain.eval.metrics``) behind ``finegrain eval`` and the report.

:func:`evaluate_policy` (sample from a policy and its reference, judge both) and
:func:`evaluate_token_credit_sources` (token credit of reward sources against the world's truth) are imported on first
use.
"""

from finegrain.eval.metrics import (
    TokenCreditResult,
    WinRate,
    auroc,
    distinct_n,
    evaluate_token_credit,
    mean_and_stderr,
    mean_token_entropy,
    precision_at_k,
    response_entropy,
    response_length,
    sequential_kl,
    win_rate,
)
from finegrain.lazy import lazy_attributes

_LAZY = {"evaluate_policy": "finegrain.eval.cli", "evaluate_token_credit_sources": "finegrain.eval.token_credit"}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    *_LAZY,
    "TokenCreditResult",
    "WinRate",
    "auroc",
    "distinct_n",
    "evaluate_token_credit",
    "mean_and_stderr",
    "mean_token_entropy",
    "precision_at_k",
    "response_entropy",
    "response_length",
    "sequential_kl",
    "win_rate",
]
