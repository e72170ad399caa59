"""Evaluation: metric functions (``finegrain.eval.metrics``) behind ``finegrain eval`` and the report.

Every name is imported on first use: the metrics, :func:`evaluate_policy` (sample from a policy and its reference,
judge both) and :func:`evaluate_token_credit_sources` (token credit of reward sources against the world's truth).
"""

from finegrain.lazy import lazy_attributes

_METRICS = ("TokenCreditResult", "WinRate", "auroc", "distinct_n", "evaluate_token_credit", "mean_and_stderr",
            "mean_token_entropy", "precision_at_k", "response_entropy", "response_length", "sequential_kl",
            "win_rate")
_LAZY = {**dict.fromkeys(_METRICS, "finegrain.eval.metrics"), "evaluate_policy": "finegrain.eval.cli",
         "evaluate_token_credit_sources": "finegrain.eval.token_credit"}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = list(_LAZY)
