"""Rule reward sources: a user's Python function, and helpers for sources that read text.

:class:`FunctionRewardSource` follows the :class:`finegrain.rewards.base.RewardSource` protocol:
``token_rewards(batch)`` returns a :class:`finegrain.types.TokenRewards` in the response layout ``(B, T)`` of the
batch (``values`` exactly 0 where ``completion_mask`` is False), checked for NaN/inf with the source named in the
error. It reads text: the batch's ``prompts`` (as the data set gave them: a string or a list of chat messages) and
``responses`` when set, else its decoded token blocks (:func:`finegrain.rewards.base.prompt_texts`).

The function ``f(prompts: list, responses: list[str]) -> list`` is loaded from ``"module:function"`` with
:mod:`importlib` (never ``eval``/``exec``). Each item is a number (a sequence score, placed on the last valid token)
or a list of numbers, one per response token of the policy's tokenization, with or without the EOS token (without
it, EOS gets 0). The function may also return a dict ``{"scores": [...], "metrics": {name: [...]}}``: the metrics
(one number or boolean per row) are reported by evaluations, as the built-in world's oracle reports well-formedness.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from finegrain.errors import ConfigError, DataError
from finegrain.ops.masked import zero_masked
from finegrain.rewards.base import check_finite, prompt_texts, response_texts
from finegrain.rewards.placement import place_on_last_token
from finegrain.types import CompletionBatch, TokenRewards

__all__ = ["FunctionRewardSource", "JudgedRewardSource", "load_function", "word_end_tokens"]


# ------------------------------------------------------------------------------------------------ text of a batch


def word_end_tokens(tokenizer: Any, token_ids: Sequence[int], text: str) -> list[int]:
    """For each whitespace-separated word of ``text``, the index of the token that completes it.

    ``text`` is the decoded response (``decode(token_ids, skip_special_tokens=True).strip()``). Word ``k`` spans
    characters ``[s_k, e_k)`` of ``text``; it is completed by the first token ``t`` whose decoded prefix
    ``decode(token_ids[:t+1]).lstrip()`` reaches ``e_k`` characters. When every non-special token decodes to
    exactly one word (the world's word-level tokenizer) this is the identity on those tokens, found without
    decoding prefixes. A word no prefix reaches (a tokenizer whose prefixes are not prefixes of the whole text)
    goes to the last token.

    Args:
        tokenizer: the policy's tokenizer.
        token_ids: the response's tokens (under its mask, EOS included).
        text: the decoded response text.

    Returns:
        One token index per word, non-decreasing.
    """
    words = text.split()
    if not words:
        return []
    ids = list(token_ids)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    plain = [t for t, i in enumerate(ids) if i not in special]
    if len(plain) == len(words) and [tokenizer.decode([ids[t]]).strip() for t in plain] == words:
        return plain
    ends, pos = [], 0
    for w in words:
        pos = text.index(w, pos) + len(w)
        ends.append(pos)
    out, k = [], 0
    for t in range(len(ids)):
        reached = len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True).lstrip())
        while k < len(ends) and reached >= ends[k]:
            out.append(t)
            k += 1
        if k == len(ends):
            break
    return out + [len(ids) - 1] * (len(ends) - k)


# ------------------------------------------------------------------------------------------------ judged texts


class JudgedRewardSource:
    """Base of the rule sources that judge each (prompt, response) text pair (the built-in world's oracle, the
    IFEval task's checkers): it decodes the batch, asks :meth:`judge`, and places the result.

    A subclass sets ``tokenizer``, ``name`` and ``dense`` and implements ``judge(prompts, responses)`` (one
    judgement per row), ``score(judgement)`` (its sequence score), optionally :meth:`metrics` and, when ``dense``,
    ``credit_row(token_ids, text, judgement)`` (one reward per valid token of the response ``text``, EOS
    included). ``token_rewards(batch)`` returns ``values (B, T)``:
    the score on the last valid token (EOS when the response has one), or, when dense, each row's
    :meth:`credit_row` on its valid tokens; ``mask = completion_mask``; ``meta["score"] (B,)``,
    ``meta["metrics"]`` (``(B,)`` tensors, read by ``finegrain eval --judge`` and ``ppo --judge``) and
    ``meta["responses"]`` (the texts).
    """

    tokenizer: Any
    name: str
    dense: bool = False

    def metrics(self, judgements: list) -> dict[str, torch.Tensor]:
        """Per-row judgements by name, ``(B,)`` each (none by default)."""
        return {}

    def token_rewards(self, batch: CompletionBatch) -> TokenRewards:
        """Rewards of the ``B`` rows of ``batch`` (see the class docstring)."""
        mask = batch.completion_mask.to(torch.bool)
        responses = response_texts(batch, self.tokenizer)
        judgements = self.judge(prompt_texts(batch, self.tokenizer), responses)
        scores = torch.tensor([self.score(j) for j in judgements], dtype=torch.float32, device=mask.device)
        if self.dense:
            values = torch.zeros(mask.shape, dtype=torch.float32)
            ids, cpu_mask = batch.completion_input_ids.cpu(), mask.cpu()
            for b, (j, text) in enumerate(zip(judgements, responses)):
                row = self.credit_row(ids[b][cpu_mask[b]].tolist(), text, j)
                values[b, cpu_mask[b]] = torch.tensor(row, dtype=torch.float32)
            values = values.to(mask.device)
        else:
            values = place_on_last_token(scores, mask)
        meta = {"score": scores, "metrics": {k: v.to(mask.device) for k, v in self.metrics(judgements).items()},
                "responses": responses}
        return check_finite(TokenRewards(values=values, mask=mask, meta=meta), self.name)


# ----------------------------------------------------------------------------------------------------- function


def load_function(spec: str) -> Callable:
    """Import ``"package.module:function"`` (the function may be a dotted attribute path, e.g. ``Class.method``).

    Raises:
        ConfigError: a malformed spec, a module that cannot be imported, or a missing / non-callable attribute.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward function {spec!r}: write it as 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward function {spec!r}: cannot import module '{module_name}': {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward function {spec!r}: '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward function {spec!r}: '{attr}' is not callable")
    return obj


def _as_float(x: Any, where: str) -> float:
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:
        x = x.item()  # a 0-d torch tensor or numpy scalar
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise DataError(f"{where}: expected a number, got {type(x).__name__} {x!r:.60}")
    return float(x)


class FunctionRewardSource:
    """A user's reward function as a reward source (see the module docstring).

    Args:
        fn: ``fn(prompts, responses) -> list`` with one item per row: a number (sequence score, on the last
            valid token) or a list of numbers, one per response token with or without EOS.
        tokenizer: the policy's tokenizer (decodes the responses, and the prompts when not given).
        name: the source name in metrics and errors (default: the function's ``__name__``).
    """

    def __init__(self, fn: Callable, tokenizer: Any, name: str | None = None):
        if not callable(fn):
            raise ConfigError(f"reward function {fn!r} is not callable")
        self.fn = fn
        self.tokenizer = tokenizer
        self.name = name or getattr(fn, "__name__", "function")

    @classmethod
    def from_spec(cls, spec: str, tokenizer: Any, name: str | None = None) -> FunctionRewardSource:
        """Load ``"module:function"`` (a leading ``"python:"`` is accepted) with importlib."""
        spec = spec.removeprefix("python:")
        fn = load_function(spec)
        return cls(fn, tokenizer, name=name or getattr(fn, "__name__", spec.rpartition(":")[2]))

    def token_rewards(self, batch: CompletionBatch) -> TokenRewards:
        """Call the function on the rows of ``batch``; place its scores; check lengths and finiteness."""
        mask = batch.completion_mask.to(torch.bool)
        n = batch.num_rows
        responses = response_texts(batch, self.tokenizer)
        out = self.fn(prompt_texts(batch, self.tokenizer), responses)
        where = f"reward function '{self.name}'"
        metrics = {}
        if isinstance(out, dict):
            if "scores" not in out:
                raise DataError(f"{where} returned a dict without 'scores'")
            metrics = out.get("metrics") or {}
            out = out["scores"]
            for key, vals in metrics.items():
                if len(vals) != n:
                    raise DataError(f"{where}: metric {key!r} has {len(vals)} values for {n} responses")
            metrics = {k: torch.tensor([float(v) for v in vals], dtype=torch.float32, device=mask.device)
                       for k, vals in metrics.items()}
        if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
            out = out.tolist()  # a torch tensor or numpy array
        if not isinstance(out, (list, tuple)):
            raise DataError(f"{where} must return a list with one item per response, got {type(out).__name__}")
        if len(out) != n:
            raise DataError(f"{where} returned {len(out)} items for {n} responses")
        lengths = mask.sum(dim=1).tolist()
        ends = torch.zeros(n, dtype=torch.bool)
        eos = [bool(x) for x in ~batch.extras["truncated"].cpu()] if "truncated" in batch.extras else [True] * n
        values = torch.zeros(mask.shape, dtype=torch.float32)
        scores = torch.zeros(n, dtype=torch.float32)
        for b, item in enumerate(out):
            if hasattr(item, "tolist") and getattr(item, "ndim", 0) > 0:
                item = item.tolist()  # a torch tensor or numpy array of token rewards
            if isinstance(item, (list, tuple)):
                per_token = [_as_float(v, f"{where}, row {b}, token {t}") for t, v in enumerate(item)]
                n_tok = int(lengths[b])
                allowed = {n_tok, n_tok - 1} if eos[b] else {n_tok}
                if len(per_token) not in allowed:
                    raise DataError(
                        f"{where}, row {b}: {len(per_token)} token rewards for a response of {n_tok} tokens "
                        f"({'with' if eos[b] else 'no'} EOS); give one per token of the policy's tokenization"
                        + (" with or without EOS" if eos[b] else "")
                    )
                values[b, : len(per_token)] = torch.tensor(per_token, dtype=torch.float32)
            else:
                scores[b] = _as_float(item, f"{where}, row {b}")
                ends[b] = True
        values = values.to(mask.device)
        # sequence scores go to the last valid token of their rows only
        placed = place_on_last_token(scores.to(mask.device), mask)
        values = torch.where(ends.to(mask.device)[:, None], placed, values)
        values = zero_masked(values, mask)
        meta = {"responses": responses, **({"metrics": metrics} if metrics else {})}
        return check_finite(TokenRewards(values=values, mask=mask, meta=meta), self.name)
