"""``finegrain po``: offline preference optimisation — DPO, SimPO, TDPO1/TDPO2, T-REG (DPO-REG, SimPO-REG).

One step for every pairwise loss, run by the shared loop (:func:`finegrain.trainers.loop.fit`). The loss is resolved
once from the registry (:func:`finegrain.losses.get_preference_loss_spec`, :func:`make_loss`), and each micro-batch
computes only what that loss declares (:func:`make_plan`): the reference's hidden states without gradient (the
frozen copy, or the LoRA policy with its adapter disabled), unless the loss is reference-free or its log-probs were
precomputed; ONE policy forward of all 2B rows (chosen first); the LM heads in chunks (:func:`batch_stats`); T-REG's
token rewards as the :class:`Plan` says. The batch loss is ``Σ_pairs loss / (pairs in the global batch)``, known on
every process, so any number of processes and accumulation steps gives the same update. The reference and
``precompute_ref_log_probs`` (its per-token values cached in the run directory) live in
:mod:`finegrain.trainers.po_reference`; docs/methods/dpo.md, tdpo.md and treg.md describe the losses.

Metrics (:mod:`finegrain.trainers.po_stats`; docs/methods/dpo.md and tdpo.md): ``loss``, ``rewards/*`` (accuracy
counts ties as wrong, as TRL does), ``logps/*``, TDPO's ``kl/*``, T-REG's ``treg/weight`` and token-reward
diagnostic, DPO-SFT's ``nll_loss``; the same names with ``split="eval"`` on held-out pairs. Throughput: ``perf/*`` as
in every trainer (docs/run-directory.md), the reference's forward counted when it runs live.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import torch

from finegrain.errors import ConfigError
from finegrain.losses import (
    PreferenceLossOutput,
    dpo_loss,
    get_preference_loss_spec,
    simpo_loss,
    tdpo_loss,
    treg_loss,
)
from finegrain.losses.dpo import dpo_sft_loss
from finegrain.models.forward import hidden_states, lm_head, predicting_states
from finegrain.ops import masked_sum
from finegrain.ops.chunked import completion_stats
from finegrain.trainers import loop
from finegrain.trainers.po_config import (  # noqa: F401 (re-exported: finegrain.trainers.po.POConfig etc.)
    DEFAULT_ALPHA,
    REG_MAPS,
    TREG_DEFAULT_ALPHA,
    Plan,
    POConfig,
    needs_reference_model,
    reg_source_is_spec,
)
from finegrain.trainers.po_reference import Reference, frozen_reference, precompute_reference
from finegrain.trainers.po_stats import (  # noqa: F401 (re-exported: finegrain.trainers.po.pair_metrics etc.)
    TREG_DIAGNOSTICS,
    PreferenceStats,
    accumulate,
    halves,
    metric_names,
    pair_metrics,
    reduce_metrics,
    shared_token_masks,
)

# ----------------------------------------------------------------------------------------------- what a step needs


def make_plan(cfg: POConfig, data, *, eval_split: bool = False) -> Plan:
    """The :class:`Plan` of ``data`` (a :class:`~finegrain.data.PreferenceData`) under ``cfg``.

    Token rewards come from the data's ``chosen_/rejected_token_rewards`` columns when present (except for
    ``dpo_implicit`` and a reward spec, which is always computed); held-out data without them score ``r̂ = 0`` for
    ``reg_source=external``; training data without them are an error for ``external``.

    Raises:
        ConfigError: ``reg_source=external`` on training data without the columns (says how to make them).
    """
    spec = get_preference_loss_spec(cfg.loss)
    has_column = bool(len(data)) and "chosen_token_rewards" in data[0]
    rewards = None
    if spec.needs_token_rewards:
        if cfg.reg_source == "dpo_implicit":
            rewards = "dpo_implicit"
        elif reg_source_is_spec(cfg):
            rewards = "source"
        elif has_column:
            rewards = "column"
        elif cfg.reg_source == "contrastive":
            rewards = "contrastive"
        elif eval_split:
            rewards = "zeros"
        else:
            raise ConfigError(
                f"--reg_source external reads per-token rewards from the columns chosen_{cfg.token_rewards_column} / "
                f"rejected_{cfg.token_rewards_column}, which {data.source} lacks; write them with `finegrain label "
                "contrastive` (or another labeller) and pass that file as --dataset_name")
    ref_logps = spec.needs_reference or rewards == "dpo_implicit"
    return Plan(ref_logps=ref_logps, ref_kl=spec.needs_ref_distribution, token_rewards=rewards)


def make_loss(cfg: POConfig) -> Callable[[PreferenceStats], PreferenceLossOutput]:
    """The configured loss as one function of :class:`PreferenceStats`, resolved once (no per-step dispatch)."""
    beta, alpha, gamma = cfg.beta, cfg.alpha, cfg.gamma

    def sums(x, s):
        return halves(masked_sum(x, s.mask, dim=-1))

    if cfg.loss == "dpo" and cfg.rpo_alpha is not None:
        def loss(s):
            return dpo_sft_loss(*sums(s.token_logps, s), *sums(s.ref_token_logps, s), halves(s.mask.sum(-1))[0],
                                beta, cfg.rpo_alpha, cfg.label_smoothing)
    elif cfg.loss == "dpo":
        def loss(s):
            return dpo_loss(*sums(s.token_logps, s), *sums(s.ref_token_logps, s), beta, cfg.label_smoothing)
    elif cfg.loss == "simpo":
        def loss(s):
            return simpo_loss(*sums(s.token_logps, s), *halves(s.mask.sum(-1)), beta, gamma)
    elif cfg.loss in ("tdpo1", "tdpo2"):
        def loss(s):
            margins = sums(s.token_logps - s.ref_token_logps, s)
            return tdpo_loss(*margins, *sums(s.token_kl, s), beta, alpha if alpha is not None else 0.5, cfg.loss)
    else:
        base = cfg.loss.split("-")[1]

        def loss(s):
            (pw, pl), (mw, ml), (rw, rl) = halves(s.token_logps), halves(s.mask), halves(s.token_rewards)
            ref_w, ref_l = halves(s.ref_token_logps) if s.ref_token_logps is not None else (None, None)
            return treg_loss(pw, ref_w, pl, ref_l, rw, rl, mw, ml, beta, alpha, base=base, gamma=gamma or 0.0,
                             token_reduction=cfg.token_reduction, weighting=cfg.weighting)
    return loss


def batch_stats(model, reference: Reference | None, batch, plan: Plan, cfg: POConfig,
                contrastive=None) -> PreferenceStats:
    """Everything the loss needs for one :class:`~finegrain.types.PreferenceBatch`, in one policy forward.

    The reference (when the plan needs it live) reads the batch first, under ``no_grad``; then the policy reads all
    ``2B`` rows once, and :func:`~finegrain.ops.chunked.completion_stats` applies both LM heads to the response
    positions in chunks: policy token log-probs (with gradient), reference token log-probs and, for TDPO, the
    forward KL over the vocabulary. Cached reference log-probs (``batch.extras["ref_token_logps"]``) replace the
    reference pass.

    Args:
        model: the policy (possibly wrapped by DDP / PEFT).
        reference: the :class:`Reference`, or None when nothing needs it.
        batch: a :class:`~finegrain.types.PreferenceBatch` on the model's device.
        plan: what to compute (:func:`make_plan`).
        cfg: the config (β, chunk size).
        contrastive: the :class:`~finegrain.rewards.contrastive.ContrastiveRewardSource` for
            ``plan.token_rewards == "contrastive"``.

    Returns:
        :class:`PreferenceStats`, every tensor ``(2B, T)``.
    """
    mask = batch.completion_mask.to(torch.bool)
    cached = batch.extras.get("ref_token_logps")
    ref_h = None
    if (plan.ref_logps and cached is None) or plan.ref_kl:
        ref_h = reference.hidden(batch)  # before the policy forward: its activations are freed first
    h = predicting_states(hidden_states(model, batch), batch)
    w, b, cap = lm_head(model)  # after the forward: under FSDP2 the root's parameters are gathered only then
    chunked = completion_stats(
        h, w, batch.completion_input_ids, mask, policy_bias=b, ref_hidden=ref_h,
        ref_weight=reference.weight if ref_h is not None else None,
        ref_bias=reference.bias if ref_h is not None else None,
        compute_kl=plan.ref_kl, chunk_size=cfg.chunk_size, logit_softcap=cap)
    out = PreferenceStats(token_logps=chunked.token_logps, mask=mask, token_kl=chunked.token_kl,
                          ref_token_logps=chunked.ref_token_logps if ref_h is not None else cached)
    if plan.token_rewards == "column":
        out.token_rewards = batch.extras["token_rewards"]
    elif plan.token_rewards == "contrastive":
        out.token_rewards = contrastive.token_rewards(batch).values
    elif plan.token_rewards == "dpo_implicit":
        from finegrain.rewards.contrastive import implicit_token_rewards, squash_to_half

        out.token_rewards = squash_to_half(implicit_token_rewards(out.token_logps, out.ref_token_logps, mask, cfg.beta))
    elif plan.token_rewards == "zeros":
        out.token_rewards = torch.zeros_like(out.token_logps)
    if out.token_rewards is not None:
        out.shared = shared_token_masks(batch.completion_input_ids, mask)
    return out


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, data, plan: Plan, loss_fn, reference, cfg: POConfig, acc, contrastive=None) -> dict[str, float]:
    """Mean of every pair metric over ``data`` (all processes share the work)."""
    model.eval()
    total: dict[str, torch.Tensor] = {}
    for _, batch in loop.eval_batches(data, cfg.per_device_eval_batch_size, acc):
        stats = batch_stats(model, reference, batch, plan, cfg, contrastive)
        accumulate(total, pair_metrics(loss_fn(stats), stats))
    model.train()
    return reduce_metrics(total, len(data), acc, metric_names(cfg))


# ----------------------------------------------------------------------------------------------- training


def _template(cfg: POConfig, tokenizer, data):
    """The contrastive template, checked against the tokenizer on the first pair (:func:`~finegrain.rewards.
    contrastive.checked_template`) and written back into ``cfg``, so config.yaml records the one actually used."""
    from finegrain.rewards.contrastive import checked_template, resolve_template

    try:
        template = resolve_template(cfg.contrastive_template, cfg.contrastive_positive, cfg.contrastive_negative)
    except ValueError as exc:
        raise ConfigError(f"--contrastive_template/positive/negative: {exc}") from None
    first = data[0] if len(data) else {"prompt": "question", "rejected_text": "answer"}
    checked_template(template, tokenizer, first["prompt"], first["rejected_text"])
    cfg.contrastive_template, cfg.contrastive_positive, cfg.contrastive_negative = (
        template.form, template.positive, template.negative)
    return template


class MappedRewards:
    """A reward source's token rewards mapped into T-REG's range (docs/methods/treg.md): ``squash`` ``σ(r) − ½``
    (:func:`~finegrain.rewards.contrastive.squash_to_half`), ``half`` ``r/2`` or ``identity``; 0 where masked."""

    def __init__(self, source, how: str = "squash"):
        if how not in REG_MAPS:
            raise ConfigError(f"reg_map must be one of {', '.join(REG_MAPS)}; got {how!r}")
        self.source, self.how = source, how
        self.name = getattr(source, "name", "source")

    @torch.no_grad()
    def token_rewards(self, batch):
        from finegrain.rewards.contrastive import squash_to_half
        from finegrain.types import TokenRewards

        got = self.source.token_rewards(batch)
        values = got.values.detach().float()
        mapped = squash_to_half(values) if self.how == "squash" else values / 2 if self.how == "half" else values
        mask = got.mask.to(torch.bool) & batch.completion_mask.to(torch.bool)
        return TokenRewards(values=torch.where(mask, mapped, torch.zeros_like(mapped)), mask=mask)


def spec_reward_source(cfg: POConfig, tokenizer, device, reference: Reference | None = None) -> MappedRewards:
    """The token-reward source of a reward spec ``cfg.reg_source`` (docs/reward-sources.md), mapped by
    ``cfg.reg_map``. Sources that read the reference (``implicit:RUN``) get the frozen reference when there is one,
    else the starting weights (``ref_model_name_or_path`` or ``model_name_or_path``) loaded once."""
    from finegrain.models.build import freeze
    from finegrain.models.loading import ModelCache
    from finegrain.rewards.registry import SourceContext, reward_source

    cache = ModelCache(device, trust_remote_code=cfg.trust_remote_code)  # each directory loaded once
    ref = reference.model if reference is not None and reference.model is not None else (
        cfg.ref_model_name_or_path or cfg.model_name_or_path)
    context = SourceContext(tokenizer=tokenizer, device=device, load_model=lambda path: freeze(cache.model(path)),
                            reference=ref, chunk_size=cfg.chunk_size)
    return MappedRewards(reward_source(cfg.reg_source, context), cfg.reg_map or "squash")


def train(cfg: POConfig, model, tokenizer, train_data, eval_data=None, *, ref_model=None) -> Path:
    """Run preference optimisation and return the run directory (``final/`` holds the model).

    Args:
        cfg: the config.
        model: the policy at its starting weights (it is trained in place).
        tokenizer: its tokenizer (saved with checkpoints; renders contrastive templates).
        train_data: a :class:`~finegrain.data.PreferenceData`.
        eval_data: held-out pairs, or None.
        ref_model: the reference model; None: ``cfg.ref_model_name_or_path``, else a frozen copy of ``model`` as
            given (or, with ``use_peft``, the policy with its adapter disabled).
    """
    acc = loop.make_accelerator(cfg)
    loss_fn, names = make_loss(cfg), metric_names(cfg)
    train_plan = make_plan(cfg, train_data)
    eval_plan = make_plan(cfg, eval_data, eval_split=True) if eval_data is not None else None
    plans = [p for p in (train_plan, eval_plan) if p is not None]
    template = _template(cfg, tokenizer, train_data) if any(p.token_rewards == "contrastive" for p in plans) else None
    run = loop.Run(cfg, "po", cfg.loss, acc)  # after the plans and the template are checked: nothing written before
    live = any(p.reference_model or p.ref_logps for p in plans)
    # the reference copies the starting weights before LoRA (frozen_reference turns its dropout off itself)
    ref_model = frozen_reference(cfg, model, ref_model, acc.device) if live else None
    t = loop.prepare(run, loop.adapt_model(cfg, model), len(train_data))
    model, num_processes = t.model, acc.num_processes
    unwrapped = acc.unwrap_model(model)
    reference = contrastive = None
    if live:
        reference = (Reference(ref_model, autocast=acc.autocast) if ref_model is not None
                     else Reference(policy=model, context=unwrapped.disable_adapter, autocast=acc.autocast))
    if any(p.token_rewards == "contrastive" for p in plans):
        from finegrain.rewards.contrastive import ContrastiveRewardSource

        contrastive = ContrastiveRewardSource(reference.scorer, tokenizer, template, context=reference.enter,
                                              chunk_size=cfg.chunk_size, autocast=acc.autocast)
    source = tag = None
    if any(p.token_rewards == "source" for p in plans):  # a reward spec: computed once into the columns
        source = spec_reward_source(cfg, tokenizer, acc.device, reference)
        tag = f"reg_source={cfg.reg_source} reg_map={cfg.reg_map or 'squash'}"
        run.print(f"T-REG token rewards from {cfg.reg_source} ({source.how}), computed once over the data")
    done = []  # each split's reference pass, cached: log-probs (and token rewards), or a reward spec's token rewards
    for data, plan, name in ((train_data, train_plan, "train"), (eval_data, eval_plan, "eval")):
        if plan is not None and cfg.precompute_ref_log_probs:
            plan = precompute_reference(data, reference, plan, cfg, acc, run.dir / "ref_cache" / f"{name}.pt",
                                        contrastive or source, template or tag, run)
        elif plan is not None and plan.token_rewards == "source":
            precompute_reference(data, reference, dataclasses.replace(plan, ref_logps=False), cfg, acc,
                                 run.dir / "ref_cache" / f"{name}_token_rewards.pt", source, tag, run)
            plan = dataclasses.replace(plan, token_rewards="column")
        done.append(plan)
    train_plan, eval_plan = done
    source = None  # its models are no longer needed
    if cfg.precompute_ref_log_probs and not any(p.reference_model for p in done if p is not None):
        reference = contrastive = ref_model = None  # everything is cached: free the reference copy
    # FLOPs per step: the policy's training on both responses, plus the reference's forward when it reads the batch
    # (TDPO's KL, or log-probs not cached); contrastive prompting's reference passes are not counted
    ref_live = train_plan.ref_kl or (train_plan.ref_logps and not cfg.precompute_ref_log_probs)

    def step(indices):
        total: dict[str, torch.Tensor] = {}
        for mb in loop.micro_steps(run, model, indices):
            batch = train_data.collate(mb).to(acc.device)
            stats = batch_stats(model, reference, batch, train_plan, cfg, contrastive)
            out = loss_fn(stats)
            # DDP averages gradients over processes; multiplying by their number keeps the global mean
            acc.backward(out.losses.sum() * num_processes / t.global_batch)
            accumulate(total, pair_metrics(out, stats))
        metrics = reduce_metrics(total, len(indices), acc, names)
        return torch.tensor(metrics["loss"], device=acc.device), metrics

    def run_eval(state):
        return evaluate(model, eval_data, eval_plan, loss_fn, reference, cfg, acc, contrastive)

    # run.json records the resolved β, α, γ
    return loop.fit(run, t, train_data, step, tokenizer=tokenizer, desc=f"po {cfg.loss}",
                    postfix=lambda m: {"acc": f"{m['rewards/accuracies']:.2f}"},
                    evaluate=run_eval if eval_data is not None else None,
                    reference=ref_live, summary=dict(beta=cfg.beta, alpha=cfg.alpha, gamma=cfg.gamma))


# ----------------------------------------------------------------------------------------------- inputs and CLI


def _preference_data(cfg: POConfig, source, tokenizer, split: str | None, max_examples: int | None):
    from finegrain.data.loading import load_rows
    from finegrain.data.prepared import PreferenceData

    rows = load_rows(source, split)
    column = cfg.token_rewards_column
    if column != "token_rewards":
        names = [f"chosen_{column}", f"rejected_{column}"]
        if any(n in rows.column_names for n in names):
            rows = rows.map(lambda row, _: {(k.replace(f"_{column}", "_token_rewards") if k in names else k): v
                                            for k, v in row.items()})
    return PreferenceData.from_source(rows, tokenizer, limits=loop.token_limits(cfg), skip_invalid=cfg.skip_invalid_rows,
                                      max_examples=max_examples)


def load_inputs(cfg: POConfig):
    """Policy, tokenizer and pairs for ``cfg`` (``--model_name_or_path``, ``--dataset_name``, optionally
    ``--eval_dataset_name``; the command line fills them with the built-in world's when no model is named)."""
    return loop.load_inputs(cfg, "po needs --model_name_or_path and --dataset_name (preference pairs); with "
                            "neither, `finegrain po` runs on the built-in world",
                            functools.partial(_preference_data, cfg))
