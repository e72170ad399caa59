"""Evaluation: metric functions (``finegrain.eval.metrics``) behind ``finegrain eval`` and the report."""

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

__all__ = [
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
