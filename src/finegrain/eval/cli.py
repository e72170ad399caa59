"""``finegrain eval``: sample a policy and its reference on held-out prompts, judge both, and compare them.

For every prompt both models sample ``num_samples`` responses with the same sampling settings and the same seed
(two generators seeded alike: common random numbers, so a policy identical to its reference samples exactly the
reference's responses). Then:

* a judge scores every response: any reward spec (:mod:`finegrain.rewards.registry`: a reward-model directory,
  ``python:module:function``, a registered kind such as the built-in world's ``oracle``), or in Python any
  ``f(prompts, responses) -> scores`` or reward-source object; the score is
  :func:`finegrain.rewards.base.sequence_scores`, and the judge's per-row metrics are averaged too;
* the policy's ``j``-th response to a prompt is compared with the reference's ``j``-th: win, tie (``|Δ| <=
  tie_tolerance``) or loss (:func:`finegrain.eval.metrics.win_rate`);
* the policy's own samples give the sequential KL ``Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t))`` (full vocabulary, summed over
  the response: an unbiased estimate of KL(π ‖ π_ref) between the two distributions over responses, by the chain
  rule), the mean per-token entropy, distinct-1/2 and the length (tokens, EOS included).

Results go to ``OUTPUT_DIR/eval.json`` and ``OUTPUT_DIR/samples.jsonl`` (docs/run-directory.md) and a table is
printed. ``--token_credit SOURCE ...`` also (or, without ``--policy``, only) scores token reward sources against
ground-truth credit and writes ``token_credit.json`` (:mod:`finegrain.eval.token_credit`). Metric definitions:
docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from finegrain.config import check_ranges, option
from finegrain.errors import ConfigError, NonFiniteError
from finegrain.eval.token_credit import format_number as _f
from finegrain.eval.token_credit import json_value, mark_eval_dir
from finegrain.models.loading import ModelCache, model_dir, refuse_reward_model, resolve_device

__all__ = ["EvalConfig", "best_of_n", "default_output_dir", "evaluate_policy", "format_eval", "make_judge", "run"]


# ------------------------------------------------------------------------------------------------ config


@dataclasses.dataclass
class EvalConfig:
    """Evaluate a policy against its reference (win rate, reward, KL, entropy, diversity) and/or score token reward
    sources against ground-truth credit."""

    policy: str | None = option(None, "model directory to evaluate (RUN/final, or a run directory RUN); needed unless only --token_credit is given")
    reference: str | None = option(None, "reference model directory (on the built-in world: its SFT model)")
    tokenizer_name_or_path: str | None = option(None, "the policy tokenizer (default: the policy's, else the reference's); enough to judge token credit of reward models alone")
    prompts: str | None = option(None, "held-out prompts (file, directory or hub id with a prompt column); with no --prompts: the built-in world's")
    prompts_split: str | None = option(None, "split of --prompts (default: the only or the train split)")
    judge: str | None = option(None, "a reward spec that scores each response: a reward-model directory, python:module:function, or a registered kind (on the built-in world: oracle, the default there); see docs/reward-sources.md")
    num_samples: int = option(1, "responses per prompt from each model (the j-th policy response is compared with the j-th reference response)")
    temperature: float = option(1.0, "sampling temperature (0: greedy); KL and entropy are taken at this temperature")
    top_p: float = option(1.0, "nucleus sampling mass (1: off)")
    top_k: int = option(0, "keep the k most likely tokens (0: off)")
    max_new_tokens: int | None = option(None, "longest response; default 256 (on the built-in world: its 40)")
    seed: int = option(0, "sampling seed (the same for policy and reference)")
    batch_size: int = option(64, "responses sampled per batch")
    chunk_rows: int = option(8, "rows per forward pass when scoring (logits are at most chunk_rows x T x V); also the batch of token-credit sources")
    max_prompts: int | None = option(None, "use only the first N prompts")
    max_prompt_length: int = option(256, "longer prompts keep their end")
    tie_tolerance: float = option(1e-6, "judge scores within this distance count as a tie")
    output_dir: str | None = option(None, "where eval.json, samples.jsonl and token_credit.json go; default: the policy's run directory when the policy is RUN/final, else runs/eval-<name>")
    device: str | None = option(None, "cpu, cuda, cuda:1, ...; default: cuda when available")
    dtype: Literal["float32", "bfloat16", "float16"] | None = option(None, "model dtype (default: float32)")
    trust_remote_code: bool = option(False, "allow models/tokenizers with custom code from the hub")
    disable_tqdm: bool = option(False, "hide the progress bar")
    # token credit
    token_credit: list[str] = option(default_factory=list, help="token reward sources to score against ground-truth credit: oracle-credit (the truth itself), or any reward spec: contrastive, implicit, implicit:<policy_dir>, a reward-model directory, python:module:function (NAME=SPEC names one)")
    credit_data: str | None = option(None, "ground truth: {prompt, response, words, credit}, {prompt, response, labels|spans} or {prompt, rejected, revised} rows; with none: the built-in world's credit rows")
    credit_split: str | None = option(None, "split of --credit_data")
    max_credit_rows: int | None = option(None, "use only the first N rows of the credit data")
    num_credit_examples: int = option(8, "responses written to token_credit.json for the report's heatmaps")
    # best-of-N
    best_of: list[str] = option(default_factory=list, help="reward specs that pick the best of N policy samples per prompt (best-of-N, as the SRM paper evaluates reward models): eval.json's best_of_n gives the judge's mean score of the picked responses for each N of --best_of_sizes (needs --num_samples >= the largest N; NAME=SPEC names one)")
    best_of_sizes: list[int] = option(default_factory=lambda: [1, 4, 16], help="the N of best-of-N")
    credit_unit: Literal["word", "token", "char"] = option("word", "edit-alignment unit for revision rows")
    contrastive_template: Literal["auto", "control", "system", "draft"] = option("auto", "the contrastive source's opposite prompts: control (an instruction with {prompt} or a prefix), system (a system turn) or draft (the paper's revision request); auto: draft (on the built-in world: control with its prefixes)")
    contrastive_positive: str | None = option(None, "positive instruction text (default: the template's)")
    contrastive_negative: str | None = option(None, "negative instruction text (default: the template's)")

    def __post_init__(self) -> None:
        if not self.policy and not self.token_credit:
            raise ConfigError("nothing to evaluate: pass --policy MODEL_DIR and/or --token_credit SOURCE ...")
        check_ranges(self, positive=("num_samples", "batch_size", "chunk_rows", "max_prompt_length", "max_new_tokens",
                                     "max_prompts", "max_credit_rows"),
                     nonnegative=("temperature", "top_k", "tie_tolerance", "num_credit_examples"),
                     unit_interval=("top_p",))
        if self.prompts and not self.reference and self.policy:
            raise ConfigError("--prompts given without --reference: on your own prompts, name the reference model")
        if self.prompts and self.policy and not self.judge:
            raise ConfigError("--prompts given without --judge: on your own prompts, name a judge (a reward-model "
                              "directory, python:module:function, ...)")


# ------------------------------------------------------------------------------------------------ models


def default_output_dir(policy: str | Path) -> Path:
    """``RUN`` for a policy at ``RUN/final`` (a run directory: it has run.json or metrics.jsonl), else
    ``runs/eval-<policy directory name>``."""
    p = Path(model_dir(policy))
    if p.name == "final" and ((p.parent / "run.json").is_file() or (p.parent / "metrics.jsonl").is_file()):
        return p.parent
    return Path("runs") / f"eval-{p.resolve().name if p.exists() else p.name}"


# ------------------------------------------------------------------------------------------------ judges


def make_judge(judge: Any, tokenizer: Any, device: Any):
    """The judge as a reward source: a reward spec (``finegrain.rewards.registry``: a reward-model directory,
    ``python:module:function``, a registered kind such as the built-in world's ``oracle``), a reward source, or a
    function ``(prompts, responses) -> scores``. Its score per response is
    :func:`finegrain.rewards.base.sequence_scores`; its per-row metrics (e.g. ``well_formed``) are averaged."""
    from finegrain.rewards.registry import SourceContext, reward_source
    from finegrain.rewards.rule import FunctionRewardSource

    if judge is None:
        raise ConfigError("pass a judge (--judge REWARD_SPEC: a reward-model directory, python:module:function, ...)")
    if isinstance(judge, (str, Path)) or callable(getattr(judge, "token_rewards", None)):
        return reward_source(judge if not isinstance(judge, Path) else str(judge),
                             SourceContext(tokenizer=tokenizer, device=device))
    if callable(judge):
        return FunctionRewardSource(judge, tokenizer)
    raise ConfigError(f"a judge is a reward spec, a reward source or a function; got {judge!r}")


def _judge_rows(judge, batch) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The judge's score ``(N,)`` and per-row metrics of the rows of ``batch`` (checked for NaN/inf)."""
    from finegrain.rewards.base import check_finite, row_metrics, sequence_scores

    with torch.no_grad():
        judged = check_finite(judge.token_rewards(batch), judge.name)
    scores = sequence_scores(judged).detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(scores).all():
        raise NonFiniteError(f"judge {judge.name} returned {int((~np.isfinite(scores)).sum())} non-finite score(s)")
    return scores, {k: v.detach().to("cpu", torch.float64).numpy() for k, v in row_metrics(judged).items()}


# ------------------------------------------------------------------------------------------------ evaluation


@dataclasses.dataclass
class _Side:
    """Per-response results of one model (policy or reference), in prompt-major order."""

    texts: list[str] = dataclasses.field(default_factory=list)
    tokens: list[list[int]] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    entropy: list[float] = dataclasses.field(default_factory=list)
    length: list[int] = dataclasses.field(default_factory=list)
    truncated: list[bool] = dataclasses.field(default_factory=list)
    seq_kl: list[float] = dataclasses.field(default_factory=list)
    seq_kl_k1: list[float] = dataclasses.field(default_factory=list)

    def add(self, roll, scores: dict, texts: list[str], rewards, metrics: dict, eos_ids: list[int]) -> None:
        from finegrain.eval.metrics import response_length, sequential_kl
        from finegrain.ops.masked import masked_mean

        mask = roll.completion_mask.to(torch.bool)
        ids = roll.completion_input_ids
        self.texts += texts
        eos = torch.tensor(eos_ids, device=ids.device)
        self.tokens += [row[m & ~torch.isin(row, eos)].tolist() for row, m in zip(ids, mask)]
        self.rewards += [float(r) for r in rewards]
        for key, values in metrics.items():
            self.metrics.setdefault(key, []).extend(float(v) for v in values)
        self.entropy += masked_mean(scores["entropy"], mask, dim=-1).tolist()
        self.length += response_length(mask).tolist()
        self.truncated += roll.extras["truncated"].tolist()
        if "full_kl" in scores:
            self.seq_kl += sequential_kl(scores["full_kl"], mask).tolist()
            self.seq_kl_k1 += sequential_kl(scores["token_logps"] - scores["ref_token_logps"], mask).tolist()

    def summary(self, num_samples: int) -> dict[str, Any]:
        from finegrain.eval.metrics import distinct_n, mean_and_stderr

        def per_prompt(values) -> np.ndarray:  # samples of one prompt are not independent: average them first
            return np.asarray(values, dtype=np.float64).reshape(-1, num_samples).mean(axis=1)

        lengths = np.asarray(self.length)
        nonempty = lengths > 0
        out: dict[str, Any] = dict(zip(("mean_reward", "mean_reward_stderr"),
                                       mean_and_stderr(per_prompt(self.rewards))))
        out.update(entropy=float(np.asarray(self.entropy)[nonempty].mean()) if nonempty.any() else math.nan,
                   distinct_1=distinct_n(self.tokens, 1), distinct_2=distinct_n(self.tokens, 2),
                   length=float(lengths.mean()), truncated_rate=float(np.mean(self.truncated)))
        # the judge's per-row metrics, e.g. the oracle's well_formed
        out.update({f"{key}_rate": float(np.mean(values)) for key, values in self.metrics.items()})
        if self.seq_kl:
            out["seq_kl"], out["seq_kl_stderr"] = mean_and_stderr(per_prompt(self.seq_kl))
            out["seq_kl_k1"] = float(np.mean(self.seq_kl_k1))
        return out


def _name(value: Any, default: str) -> str:
    """How eval.json names a model, judge or prompts: ``str(value)`` for a path or spec, else ``default``."""
    return str(value) if isinstance(value, (str, Path)) else default


def _load_models(policy, reference, tokenizer, models: ModelCache) -> tuple:
    """``(policy, reference, policy_model, ref_model, tokenizer)``: directories resolved (``RUN`` -> ``RUN/final``)
    and loaded once through ``models``; loaded models are used as given. The two must share a vocabulary."""
    policy, reference = (x if isinstance(x, torch.nn.Module) else model_dir(x) for x in (policy, reference))
    for role, path in (("policy", policy), ("reference", reference)):
        if not isinstance(path, torch.nn.Module):
            refuse_reward_model(path, f"--{role}")
    if isinstance(policy, torch.nn.Module) and tokenizer is None:
        raise ConfigError("evaluate_policy: a policy given as a model needs its tokenizer (tokenizer=...)")
    policy_model = policy.eval() if isinstance(policy, torch.nn.Module) else models.model(policy)
    tokenizer = tokenizer if tokenizer is not None else models.tokenizer(policy)
    ref_model = reference.eval() if isinstance(reference, torch.nn.Module) else models.model(reference)
    ref_tokenizer = None
    if not isinstance(reference, torch.nn.Module):
        # a directory without a tokenizer: the head sizes are still compared
        with contextlib.suppress(ConfigError):
            ref_tokenizer = models.tokenizer(reference)
    v_pol, v_ref = (m.get_output_embeddings().weight.shape[0] for m in (policy_model, ref_model))
    if v_pol != v_ref or (ref_tokenizer is not None and ref_tokenizer.get_vocab() != tokenizer.get_vocab()):
        raise ConfigError(
            f"the policy and the reference have different vocabularies ({v_pol} vs {v_ref} output tokens, or "
            "different tokenizers): KL and paired sampling need the same tokenizer; pass the policy's own --reference"
        )
    return policy, reference, policy_model, ref_model, tokenizer


def _comparison(pol: _Side, ref: _Side, num_samples: int, tie_tolerance: float) -> dict[str, Any]:
    """The metric keys of eval.json from the two sides' per-response results."""
    from finegrain.eval.metrics import win_rate

    outcome = win_rate(pol.rewards, ref.rewards, tol=tie_tolerance)
    p, r = pol.summary(num_samples), ref.summary(num_samples)
    out = {
        "num_responses": len(pol.rewards),
        "win_rate": outcome.win, "tie_rate": outcome.tie, "loss_rate": outcome.loss,
        "mean_reward": p["mean_reward"], "mean_reward_stderr": p["mean_reward_stderr"],
        "ref_mean_reward": r["mean_reward"], "ref_mean_reward_stderr": r["mean_reward_stderr"],
        "seq_kl": p["seq_kl"], "seq_kl_stderr": p["seq_kl_stderr"], "seq_kl_k1": p["seq_kl_k1"],
        "entropy": p["entropy"], "ref_entropy": r["entropy"],
        "distinct_1": p["distinct_1"], "distinct_2": p["distinct_2"],
        "ref_distinct_1": r["distinct_1"], "ref_distinct_2": r["distinct_2"],
        "length": p["length"], "ref_length": r["length"],
        "truncated_rate": p["truncated_rate"], "ref_truncated_rate": r["truncated_rate"],
    }
    for key in pol.metrics:  # the judge's per-row metrics, averaged: <metric>_rate
        out[f"{key}_rate"], out[f"ref_{key}_rate"] = p[f"{key}_rate"], r[f"{key}_rate"]
    return out


def evaluate_policy(
    policy: str | Path | torch.nn.Module,
    reference: str | Path | torch.nn.Module,
    cfg: EvalConfig | None = None,
    *,
    tokenizer: Any = None,
    models: ModelCache | None = None,
    policy_name: str | None = None,
    reference_name: str | None = None,
    quiet: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Sample the policy and the reference on the same prompts, judge both, and compute the comparison metrics.

    (``finegrain eval`` with no ``--prompts`` fills in the built-in world's prompts, reference and judge.)
    The metrics are summed up in the module docstring and defined exactly in docs/evaluation.md ("Metrics"):
    ``win_rate`` / ``tie_rate`` / ``loss_rate``, ``mean_reward`` and ``ref_mean_reward`` with standard errors over
    prompts, ``seq_kl`` (and ``seq_kl_k1``), ``entropy``, ``distinct_1`` / ``distinct_2``, ``length``,
    ``truncated_rate`` and ``<metric>_rate`` per judge metric, each but the KL also for the reference (``ref_``).

    Args:
        policy: the policy's directory or a loaded causal LM (then pass ``tokenizer``).
        reference: the reference's directory or model.
        cfg: the settings (:class:`EvalConfig`; its ``policy``/``reference`` are not read, the arguments are).
        tokenizer: the policy tokenizer (default: loaded from the policy's directory).
        models: a :class:`ModelCache` to share with other calls: loaded models, and the reference's samples and
            scores (reused when the reference directory, prompts, judge and sampling settings are the same).
        policy_name: the policy's name in ``eval.json`` (default: its path).
        reference_name: the reference's name in ``eval.json`` (default: its path).
        quiet: do not print the table.
        **options: :class:`EvalConfig` fields that override ``cfg`` (Python callers:
            ``evaluate_policy(p, r, prompts=..., judge=..., max_prompts=8)``). Beyond the command line's types,
            ``prompts`` may be anything :func:`finegrain.data.load_rows` accepts with a ``prompt`` column, ``judge``
            and every ``best_of`` entry a reward source (``token_rewards(batch)``) or a function
            ``(prompts, responses) -> scores`` (:func:`make_judge`), ``device`` a ``torch.device``;
            ``output_dir=None`` writes nothing.

    Returns:
        The content of ``eval.json`` (docs/run-directory.md); NaN values (a standard error from one prompt) are None.
    """
    from tqdm.auto import tqdm

    from finegrain.data.prepared import CompletionData
    from finegrain.data.tokenize import TokenLimits
    from finegrain.rewards.base import decode_responses
    from finegrain.rewards.registry import split_name
    from finegrain.rl.rollout import resolve_special_ids, sample_rollouts, score_rollout

    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(EvalConfig)})
    if unknown:
        raise TypeError(f"evaluate_policy: unknown option(s) {', '.join(unknown)} (EvalConfig fields are accepted)")
    names = {"policy": policy if not isinstance(policy, torch.nn.Module) else "model", "reference": reference}
    cfg = dataclasses.replace(cfg, **options) if cfg is not None else EvalConfig(**names, **options)
    num_samples, temperature = cfg.num_samples, cfg.temperature
    dev = resolve_device(cfg.device)
    models = models or ModelCache(dev, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.prompts is None or reference is None:
        raise ConfigError("evaluate_policy needs prompts and a reference model (--prompts, --reference)")
    policy, reference, policy_model, ref_model, tokenizer = _load_models(policy, reference, tokenizer, models)
    judge_source = make_judge(cfg.judge, tokenizer, dev)
    judge_name = _name(cfg.judge, judge_source.name)
    max_new_tokens = 256 if cfg.max_new_tokens is None else cfg.max_new_tokens
    limits = TokenLimits(max_length=None, max_prompt_length=cfg.max_prompt_length)
    data = CompletionData.from_source(cfg.prompts, tokenizer, split=cfg.prompts_split, kind="prompt",
                                      limits=limits, max_examples=cfg.max_prompts)
    eos_ids, _ = resolve_special_ids(policy_model, tokenizer)
    sampling = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature,
                    top_k=cfg.top_k, top_p=cfg.top_p, num_samples=num_samples, tokenizer=tokenizer)
    per_batch = max(1, cfg.batch_size // num_samples)
    raw_prompts = [data[i]["prompt"] for i in range(len(data)) for _ in range(num_samples)]

    def sample_side(model, label: str, with_kl: bool) -> _Side:
        """Sample and score one model on every prompt; its generator is seeded alike for both models."""
        side, gen = _Side(), torch.Generator(device=dev).manual_seed(cfg.seed)
        for lo in tqdm(range(0, len(data), per_batch), desc=f"eval {label}", disable=cfg.disable_tqdm):
            idx = list(range(lo, min(lo + per_batch, len(data))))
            batch = data.collate(idx).to(dev)
            roll = sample_rollouts(model, batch.prompt_input_ids, batch.prompt_attention_mask, generator=gen,
                                   **sampling)
            scores = score_rollout(model, roll, ref_model=ref_model if with_kl else None,
                                   chunk_rows=cfg.chunk_rows, with_entropy=True,
                                   temperature=temperature if temperature > 0 else 1.0, with_full_kl=with_kl)
            texts = decode_responses(tokenizer, roll)
            roll.prompts = raw_prompts[lo * num_samples : (lo + len(idx)) * num_samples]
            roll.responses = texts
            rewards, metrics = _judge_rows(judge_source, roll)
            side.add(roll, scores, texts, rewards, metrics, eos_ids)
            if label == "policy":
                for name, selector in selectors.items():
                    picks[name] += _judge_rows(selector, roll)[0].tolist()
        return side

    selectors = {}
    for spec in cfg.best_of:
        given, _ = split_name(spec) if isinstance(spec, str) else (None, spec)
        selector = make_judge(spec, tokenizer, dev)
        selectors[given or _name(spec, selector.name)] = selector
    if selectors and num_samples < max(cfg.best_of_sizes):
        raise ConfigError(f"best-of-{max(cfg.best_of_sizes)} needs at least that many samples per prompt: pass "
                          f"--num_samples {max(cfg.best_of_sizes)} (or smaller --best_of_sizes)")
    picks: dict[str, list[float]] = {name: [] for name in selectors}
    pol = sample_side(policy_model, "policy", with_kl=True)
    # The reference's samples and scores depend only on the reference, the prompts, the judge and the sampling
    # settings: a shared ModelCache keeps them, so evaluating several policies against one reference samples it once.
    ref_key = None
    if not isinstance(reference, torch.nn.Module) and all(isinstance(x, (str, Path))
                                                          for x in (cfg.judge, cfg.prompts)):
        ref_key = (ModelCache._key(reference), str(cfg.prompts), cfg.prompts_split, cfg.max_prompts,
                   cfg.max_prompt_length, judge_name, num_samples, temperature, cfg.top_p, cfg.top_k,
                   max_new_tokens, cfg.seed, per_batch, cfg.chunk_rows, str(dev))
    ref = models.reference_samples.get(ref_key) if ref_key else None
    if ref is None:
        ref = sample_side(ref_model, "reference", with_kl=False)
        if ref_key:
            models.reference_samples[ref_key] = ref

    result: dict[str, Any] = {
        "policy": policy_name or _name(policy, type(policy).__name__),
        "reference": reference_name or _name(reference, type(reference).__name__),
        "judge": judge_name,
        "prompts": _name(cfg.prompts, type(cfg.prompts).__name__),
        "num_prompts": len(data),
        "num_samples": num_samples,
        **_comparison(pol, ref, num_samples, cfg.tie_tolerance),
    }
    if selectors:
        result["best_of_n"] = {name: best_of_n(pol.rewards, picks[name], num_samples, cfg.best_of_sizes)
                               for name in selectors}
    result.update(temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=max_new_tokens,
                  seed=cfg.seed, tie_tolerance=cfg.tie_tolerance)
    result = {k: json_value(v) for k, v in result.items()}

    if cfg.output_dir is not None:
        _write_outputs(Path(cfg.output_dir), result, raw_prompts, pol, ref, num_samples)
    if not quiet:
        print(format_eval(result, cfg.output_dir))
    return result


def best_of_n(judge_scores: Sequence[float], selector_scores: Sequence[float], num_samples: int,
              sizes: Sequence[int]) -> dict[str, float]:
    """Best-of-N: for each prompt (``num_samples`` consecutive responses) and each ``N`` of ``sizes``, the judge's
    score of the response the selector scores highest among the prompt's first ``N`` (ties: the first), averaged
    over prompts.

    ``bon(N) = (1/P) Σ_p judge[p, argmax_{j<N} selector[p, j]]``. With the judge as its own selector it is the mean
    of the per-prompt maxima, non-decreasing in N; ``bon(1)`` is the mean score of the first samples.

    Example:
        >>> best_of_n([1.0, 5.0, 2.0, 0.0], [0.0, 1.0, 3.0, 2.0], 2, (1, 2))
        {'1': 1.5, '2': 3.5}
    """
    judge = np.asarray(judge_scores, dtype=np.float64).reshape(-1, num_samples)
    select = np.asarray(selector_scores, dtype=np.float64).reshape(-1, num_samples)
    return {str(n): float(judge[np.arange(len(judge)), select[:, :n].argmax(axis=1)].mean())
            for n in sorted(set(sizes)) if n <= num_samples}


def _write_outputs(out: Path, result: dict, prompts: list, pol: _Side, ref: _Side, num_samples: int) -> None:
    from finegrain.data.files import write_jsonl, write_text

    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt, "sample": i % num_samples, "response": pol.texts[i],
               "ref_response": ref.texts[i], "reward": pol.rewards[i], "ref_reward": ref.rewards[i],
               "seq_kl": pol.seq_kl[i], "entropy": pol.entropy[i], "length": pol.length[i],
               "ref_length": ref.length[i], "truncated": pol.truncated[i], "ref_truncated": ref.truncated[i]}
        for key in pol.metrics:  # the judge's per-row metrics (the world's oracle: well_formed)
            row.update({key: pol.metrics[key][i], f"ref_{key}": ref.metrics[key][i]})
        rows.append({k: json_value(v) for k, v in row.items()})
    try:
        write_text(out / "eval.json", json.dumps(result, indent=1, allow_nan=False) + "\n")
        write_jsonl(out / "samples.jsonl", rows, ensure_ascii=True)
        mark_eval_dir(out)
    except OSError as exc:
        raise ConfigError(f"cannot write the evaluation to {out}: {exc.strerror or exc}; choose another "
                          "--output_dir") from None


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_eval(result: dict[str, Any], output_dir: str | Path | None = None) -> str:
    """The readable table ``finegrain eval`` prints: policy and reference side by side, then the comparison."""

    def pm(mean, se):
        return _f(mean) + ("" if se is None else f" ± {_f(se)}")

    rows = [("mean reward", pm(result["mean_reward"], result["mean_reward_stderr"]),
             pm(result["ref_mean_reward"], result["ref_mean_reward_stderr"]))]
    # (label, key, format) of the rows with the policy's result[key] and the reference's result["ref_" + key]
    both = [("well-formed", "well_formed_rate", _pct)] if "well_formed_rate" in result else []
    both += [("length (tokens)", "length", lambda x: _f(x, 1)), ("entropy (nats/token)", "entropy", _f),
             ("distinct-1", "distinct_1", _f), ("distinct-2", "distinct_2", _f),
             ("no EOS (truncated)", "truncated_rate", _pct)]
    rows += [(label, fmt(result[key]), fmt(result[f"ref_{key}"])) for label, key, fmt in both]
    width = max(len(a) for a, _, _ in rows) + 2
    lines = [
        f"eval of {result['policy']} against {result['reference']}: {result['num_prompts']} prompts x "
        f"{result['num_samples']} sample(s), judge {result['judge']}",
        f"  {'':<{width}}{'policy':>18}{'reference':>18}",
    ]
    lines += [f"  {a:<{width}}{b:>18}{c:>18}" for a, b, c in rows]
    lines += [
        f"  {'seq KL(policy || ref)':<{width}}{pm(result['seq_kl'], result['seq_kl_stderr']):>18}",
        f"  {'win / tie / loss':<{width}}{_pct(result['win_rate'])} / {_pct(result['tie_rate'])} / "
        f"{_pct(result['loss_rate'])}",
    ]
    for name, by_n in (result.get("best_of_n") or {}).items():
        lines.append(f"  best-of-N picked by {name}: " + ", ".join(f"N={n} {_f(v)}" for n, v in by_n.items()))
    if output_dir is not None:
        lines.append(f"wrote {Path(output_dir) / 'eval.json'} and {Path(output_dir) / 'samples.jsonl'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Run ``finegrain eval`` for a parsed config; returns ``{"eval": ..., "token_credit": ...}`` (None if not run)."""
    dev = resolve_device(cfg.device)
    models = ModelCache(dev, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    out = Path(cfg.output_dir) if cfg.output_dir else (
        default_output_dir(cfg.policy) if cfg.policy else Path("runs") / "eval-token-credit")
    results: dict[str, Any] = {"eval": None, "token_credit": None}
    if cfg.policy:
        results["eval"] = evaluate_policy(cfg.policy, cfg.reference, cfg, output_dir=out, device=dev, quiet=False,
                                          models=models)
    if cfg.token_credit:
        from finegrain.eval.token_credit import evaluate_token_credit_sources
        from finegrain.rewards.contrastive import resolve_template

        try:
            template = resolve_template(cfg.contrastive_template, cfg.contrastive_positive,
                                        cfg.contrastive_negative)
        except ValueError as exc:
            raise ConfigError(f"--contrastive_template/positive/negative: {exc}") from None
        results["token_credit"] = evaluate_token_credit_sources(
            cfg.token_credit, data=cfg.credit_data, split=cfg.credit_split, policy=cfg.policy,
            reference=cfg.reference, output_dir=out, max_rows=cfg.max_credit_rows, tokenizer=cfg.tokenizer_name_or_path,
            contrastive_template=template,
            num_examples=cfg.num_credit_examples, unit=cfg.credit_unit, batch_size=max(1, cfg.chunk_rows),
            device=dev, models=models,
        )
    return results
