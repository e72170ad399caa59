"""``finegrain ppo``: online RL with dense per-token rewards -- PPO (GAE + critic), REINFORCE or RLOO.

docs/methods/ppo.md gives the papers, the reward ``R_t = clip(norm(Σ_s c_s·r^s_t)) − c_KL·KL_t``, the estimators,
keys, metrics and deviations, and the step this file implements for the shared loop
(:func:`finegrain.trainers.loop.run_steps`). One step is one rollout batch: generate (the policy in eval mode samples
with the KV cache, :func:`finegrain.rl.streams.sample_groups`), score (:func:`finegrain.rl.rollout.score_rollout`,
critic values, each source's token rewards, :func:`finegrain.rl.rewards.dense_rewards`, :func:`compute_advantages`),
train (:func:`ppo_update`: minibatches that are each an equal share of every sampling group), then log, evaluate on
held-out prompts and checkpoint. Reward sources are those of docs/reward-sources.md, mixed with ``--reward_scales``;
``--judge SPEC`` names one that is logged (``<name>/reward``, ``<name>/<metric>``), not trained on.

Processes: each takes a contiguous share of the rollout batch's prompts; losses are normalised over all of them
and whitening and reward normalisation reduce across them. With ``--generation_batch_size`` every sampling group
and every minibatch shuffle draws from its own random stream, named by the seed and its place in the data
(:class:`RolloutPlace`), so the same global batch samples the same responses and takes the same update on any
number of processes (tests/scale/test_multiprocess.py); without it they draw from the global RNG, as a
checkpoint restores it.

The models (reference, critic, their optimizers) are set up in :mod:`finegrain.trainers.ppo_models`, the random
streams live in :mod:`finegrain.rl.streams`, the config in :mod:`finegrain.trainers.ppo_config`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from finegrain.data.sampler import shard_batch
from finegrain.errors import ConfigError
from finegrain.losses.ppo import entropy_bonus, ppo_policy_loss, ppo_value_loss
from finegrain.models.forward import hidden_states, output_head, predicting_states
from finegrain.ops.kl import kl_k1, kl_penalty
from finegrain.ops.logprobs import token_entropy, token_logps
from finegrain.ops.masked import masked_sum
from finegrain.rewards.base import decode_responses, row_metrics, sequence_scores
from finegrain.rl.advantages import discounted_returns, gae_advantages, rloo_advantages, whiten_advantages
from finegrain.rl.rewards import RunningMoments, dense_rewards, lag_rewards, reward_metrics
from finegrain.rl.rollout import sample_rollouts, score_rollout, take_rows
from finegrain.rl.streams import RolloutPlace, minibatch_rows, sample_groups
from finegrain.trainers import loop
from finegrain.trainers.ppo_config import PPOConfig  # re-exported: finegrain.trainers.ppo.PPOConfig
from finegrain.trainers.ppo_models import Models, critic_values, rollout_values, setup_models
from finegrain.trainers.throughput import count_ppo_work, flops_model, lora_weights
from finegrain.types import CompletionBatch

# ----------------------------------------------------------------------------------------------- reward sources


def build_reward_sources(cfg: PPOConfig, tokenizer, device, reference=None,
                         reference_context=None) -> dict[str, tuple[Any, float]]:
    """The sources named by ``--reward`` with their scales: name -> (source, scale); names are made unique.

    Specs go through the reward registry (:func:`finegrain.rewards.registry.reward_sources`); ``reference`` (or a
    LoRA policy with ``reference_context``) serves ``contrastive`` and ``implicit``.

    Raises:
        ConfigError: no ``--reward``, an unknown spec, or ``--lag`` with a source that scores whole responses (the
            lag would push its last-token score past the end).
    """
    from finegrain.rewards.registry import SourceContext, reward_sources

    if not cfg.reward:
        raise ConfigError("--reward needs at least one reward source (a reward-model directory, "
                          "python:module:function, ...; on the built-in world the default is oracle)")
    context = SourceContext(tokenizer=tokenizer, device=device, reference=reference,
                            reference_context=reference_context)
    sources = reward_sources(cfg.reward, context)
    if cfg.lag and any(getattr(s, "dense", True) is False for s in sources.values()):
        raise ConfigError("--lag shifts token rewards one position later, which drops a score on the last token; use "
                          "it with token-level sources only (TLCR's discriminator), not with sequence-level rewards")
    return {name: (source, scale) for (name, source), scale in zip(sources.items(), cfg.scales)}


def build_judge(cfg: PPOConfig, tokenizer, device):
    """The ``--judge`` source (logged, not trained on), or None."""
    if cfg.judge is None:
        return None
    from finegrain.rewards.registry import SourceContext, reward_source

    return reward_source(cfg.judge, SourceContext(tokenizer=tokenizer, device=device))


def judge_metrics(judge, batch: CompletionBatch) -> dict[str, torch.Tensor]:
    """``<name>/reward`` (the judge's score per row) and ``<name>/<metric>`` per row for a rollout batch."""
    judged = judge.token_rewards(batch)
    out = {f"{judge.name}/reward": sequence_scores(judged)}
    out.update({f"{judge.name}/{k}": v for k, v in row_metrics(judged).items()})
    return out


# ----------------------------------------------------------------------------------------------- per-row pieces


def whiten(x: torch.Tensor, mask: torch.Tensor, acc) -> torch.Tensor:
    """``(x − mean) / sqrt(var + 1e-8)`` over the valid tokens of every process (unbiased variance, as
    :func:`finegrain.ops.masked_whiten`, which it equals on one process); 0 outside ``mask``."""
    if acc.num_processes == 1:
        return whiten_advantages(x, mask)
    m = mask.to(torch.bool)
    xs = torch.where(m, x, torch.zeros_like(x)).double()
    stats = acc.reduce(torch.stack([m.sum().double(), xs.sum(), xs.square().sum()]), reduction="sum")
    count, total, squares = stats.tolist()
    mean = total / max(count, 1.0)
    var = (squares - count * mean * mean) / max(count - 1.0, 1.0)
    return torch.where(m, (x - mean) / math.sqrt(var + 1e-8), torch.zeros_like(x))


def compute_advantages(cfg: PPOConfig, penalized: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None,
                       acc) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(advantages, returns)`` of the estimator (returns: the value targets, GAE only; else None)."""
    returns = None
    if cfg.estimator == "gae":
        advantages, returns = gae_advantages(penalized, values, mask, cfg.gamma, cfg.lam)
    elif cfg.estimator == "reinforce":
        advantages = discounted_returns(penalized, mask, cfg.gamma)
    else:
        advantages = rloo_advantages(masked_sum(penalized, mask, dim=-1), cfg.num_samples, mask)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask, acc)
    return advantages, returns


# ----------------------------------------------------------------------------------------------- the update


def _row_weight(mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """What one micro-batch contributes to its minibatch's mean: valid tokens, or responses."""
    mask = mask.to(torch.bool)
    return (mask.sum() if reduction == "token" else mask.any(dim=1).sum()).float()


def ppo_update(cfg: PPOConfig, run, state, m: Models, roll: CompletionBatch, data: dict[str, torch.Tensor],
               place: RolloutPlace):
    """``ppo_epochs`` passes over shuffled minibatches of the rollout (:func:`minibatch_rows`); one optimizer step
    per minibatch.

    The loss of a minibatch is its token mean (or response mean) over every process: each micro-batch's mean is
    weighted by its share of the minibatch's tokens (responses), times the number of processes because DDP
    averages gradients. Returns the mean of the per-minibatch statistics.
    """
    acc, num_processes = run.accelerator, run.accelerator.num_processes
    policy, critic = m.policy, m.critic
    shared = critic is not None and m.critic_optimizer is None
    head = output_head(acc.unwrap_model(policy))
    n = roll.num_rows
    stats: dict[str, list[float]] = defaultdict(list)
    for ppo_epoch in range(cfg.ppo_epochs):
        for mb in minibatch_rows(n, place, cfg.num_samples, cfg.num_mini_batches, ppo_epoch):
            micro = mb.split(cfg.per_device_train_batch_size)
            denom = sum(_row_weight(roll.completion_mask[r], cfg.loss_reduction) for r in micro)
            if num_processes > 1:
                denom = acc.reduce(denom.to(acc.device), reduction="sum")
            sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=acc.device))
            for k, rows in enumerate(micro):
                rows = rows.to(acc.device)
                sub, width = take_rows(roll, rows)
                mask = sub.completion_mask
                part = {key: value[rows, :width] for key, value in data.items()}
                w = _row_weight(mask, cfg.loss_reduction) * num_processes / denom
                sync = k == len(micro) - 1
                ctx = contextlib.ExitStack()
                if not sync and num_processes > 1:
                    for module in (policy, critic):
                        if module is not None:
                            ctx.enter_context(acc.no_sync(module))
                with ctx:
                    h = predicting_states(hidden_states(policy, sub), sub)
                    logits = head(h)
                    if cfg.temperature != 1.0:
                        logits = logits / cfg.temperature
                    logps = token_logps(logits, sub.completion_input_ids, mask)
                    pl = ppo_policy_loss(logps, part["old_logps"], part["advantages"], mask, cfg.clip_eps,
                                         cfg.loss_reduction)
                    loss = pl.loss
                    if cfg.entropy_coef:
                        loss = loss - cfg.entropy_coef * entropy_bonus(token_entropy(logits), mask, cfg.loss_reduction)
                    if critic is not None:
                        values = critic_values(critic, policy, sub, hidden=h if shared else None)
                        vl = ppo_value_loss(values, part["old_values"], part["returns"], mask, cfg.value_clip_eps,
                                            cfg.loss_reduction)
                        loss = loss + cfg.vf_coef * vl.loss
                        sums["value/loss"] += vl.loss.detach() * w
                        sums["value/clipfrac"] += vl.clipfrac * w
                    acc.backward(loss * w)
                sums["policy/loss"] += pl.loss.detach() * w
                sums["policy/clipfrac"] += pl.clipfrac * w
                sums["policy/approx_kl"] += pl.approx_kl * w
            total = sum(sums.values()) if sums else torch.zeros((), device=acc.device)
            step = loop.optimizer_step(run, state, m.trainable, m.optimizer, m.scheduler, total)
            if m.critic_optimizer is not None:
                loop.optimizer_step(run, state, critic, m.critic_optimizer, m.critic_scheduler, total)
            for key, value in sums.items():
                stats[key].append(float(acc.reduce(value, reduction="sum") / num_processes if num_processes > 1 else value))
            stats["grad_norm"].append(step["grad_norm"])
            stats["skipped"].append(step["skipped"])
            stats["learning_rate"] = [step["learning_rate"]]
    return {k: sum(v) / len(v) for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------- evaluation


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def evaluate(cfg: PPOConfig, m: Models, tokenizer, data, sources, acc, step: int, judge=None) -> dict[str, float]:
    """Responses to held-out prompts (greedy, or sampled with a generator seeded by ``seed`` and ``step``, so
    the training RNG is untouched); the judge's score and metrics (when there is one), the sources' raw reward,
    and the KL to the reference summed over each response, ``Σ_t KL(π_θ(·|s_t) ‖ π_ref(·|s_t))`` over the full
    vocabulary."""
    policy = m.policy_u
    policy.eval()
    num_processes = acc.num_processes
    greedy = cfg.eval_sampling == "greedy"
    gen = None if greedy else torch.Generator(device=acc.device).manual_seed(cfg.seed * 1_000_003 + step)
    keys = ["count", "kl", "length", "raw"]
    sums = torch.zeros(len(keys), dtype=torch.float64, device=acc.device)
    judged_sums: dict[str, float] = {}
    for chunk, batch in loop.eval_batches(data, cfg.per_device_eval_batch_size, acc):
        roll = sample_rollouts(policy, batch.prompt_input_ids, batch.prompt_attention_mask,
                               max_new_tokens=cfg.max_new_tokens, do_sample=not greedy, temperature=cfg.temperature,
                               top_k=cfg.top_k, top_p=cfg.top_p, tokenizer=tokenizer, generator=gen)
        roll.prompts, roll.responses = batch.prompts, decode_responses(tokenizer, roll)
        mask = roll.completion_mask
        scored = score_rollout(policy, roll, ref_model=m.ref_model, ref_context=m.ref_context,
                               chunk_rows=cfg.score_chunk_rows, temperature=cfg.temperature, with_full_kl=True)
        rewards = {name: src.token_rewards(roll) for name, (src, _) in sources.items()}
        raw = dense_rewards(rewards, mask, scales={k: s for k, (_, s) in sources.items()})["raw"]
        row = [float(len(chunk)), float(masked_sum(scored["full_kl"], mask, dim=-1).sum()),
               float(mask.sum()), float(masked_sum(raw, mask, dim=-1).sum())]
        sums += torch.tensor(row, dtype=torch.float64, device=acc.device)
        if judge is not None:
            for key, value in judge_metrics(judge, roll).items():
                judged_sums[key] = judged_sums.get(key, 0.0) + float(value.sum())
    names = sorted(judged_sums)
    if judge is not None and num_processes > 1:  # every process reduces the same keys, also one that had no rows
        from accelerate.utils import gather_object

        names = sorted({k for part in gather_object([names]) for k in part})
    totals = torch.cat([sums, torch.tensor([judged_sums.get(k, 0.0) for k in names], dtype=torch.float64,
                                           device=acc.device)])
    if num_processes > 1:
        totals = acc.reduce(totals, reduction="sum")
    mean = dict(zip(keys + names, (totals / totals[0].clamp(min=1)).tolist()))
    out = {"objective/kl": mean["kl"], "response/length": mean["length"], "rewards/raw": mean["raw"]}
    out.update({k: mean[k] for k in names})
    return out


# ----------------------------------------------------------------------------------------------- the loop


def train(cfg: PPOConfig, policy, tokenizer, prompts, eval_prompts=None, *, sources=None, method: str | None = None) -> Path:
    """Run online RL and return the run directory (``final/`` holds the policy).

    Args:
        cfg: the config.
        policy: a causal LM (the initial policy; also the reference).
        tokenizer: its tokenizer.
        prompts: a :class:`finegrain.data.prepared.CompletionData` of prompt rows.
        eval_prompts: held-out prompt rows, or None.
        sources: name -> (reward source, scale); default :func:`build_reward_sources` of ``cfg``.
        method: the method name in run.json (default: the estimator).
    """
    acc = loop.make_accelerator(cfg)
    num_processes, device = acc.num_processes, acc.device
    if cfg.rollout_batch_size % num_processes:
        raise ConfigError(f"rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of the {num_processes} processes")
    group_size = cfg.generation_batch_size or cfg.rollout_batch_size // num_processes
    if (cfg.rollout_batch_size // num_processes) % group_size:
        raise ConfigError(f"generation_batch_size ({group_size}) must divide each process's share of the rollout batch "
                          f"(rollout_batch_size / processes = {cfg.rollout_batch_size // num_processes})")
    if (group_size * cfg.num_samples) % cfg.num_mini_batches:
        raise ConfigError(f"each process samples {group_size * cfg.num_samples} rows per group, which do not split into "
                          f"num_mini_batches ({cfg.num_mini_batches}) equal parts; set --generation_batch_size or "
                          "change --num_mini_batches")
    total_steps = loop.num_training_steps(cfg, len(prompts), cfg.rollout_batch_size, (
        f"the prompt set has {len(prompts)} rows, fewer than one rollout batch (--rollout_batch_size "
        f"{cfg.rollout_batch_size}); lower it or add prompts"))
    m = setup_models(cfg, policy, acc, updates=total_steps * cfg.ppo_epochs * cfg.num_mini_batches)
    mf, lora = flops_model(m.policy_u), lora_weights(m.policy_u)
    if sources is None:
        sources = build_reward_sources(cfg, tokenizer, device, reference=m.ref_model or m.policy_u,
                                       reference_context=None if m.ref_model is not None else m.ref_context)
    scales = {name: scale for name, (_, scale) in sources.items()}
    judge = build_judge(cfg, tokenizer, device)
    run = loop.Run(cfg, "ppo", method or cfg.estimator, acc)  # after every input is validated: nothing written before
    if run.resume_from is None:
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # the same seed samples the same first rollout whatever the set-up consumed (e.g. sources)
    t = loop.Training(m.policy, m.optimizers, m.schedulers, cfg.rollout_batch_size, total_steps,
                      extra_models=m.saved_extra, samples_per_step=cfg.rollout_batch_size * cfg.num_samples)
    running = RunningMoments()
    gather = acc.gather if num_processes > 1 else None
    normalize = None if cfg.reward_normalization == "none" else cfg.reward_normalization

    def step(state, indices):
        # the running reward moments live in state.extra, so that a resumed run continues with the checkpoint's
        running.load_state_dict(state.extra.get("running_reward", running.state_dict()))
        local = shard_batch(indices, num_processes, acc.process_index)
        place = RolloutPlace(cfg.seed, state.epoch, state.batch_in_epoch, group_size,
                             acc.process_index * len(local) // group_size, cfg.generation_batch_size is not None)

        # 1. generate
        t0 = time.perf_counter()
        m.policy_u.eval()
        roll = sample_groups(m.policy_u, prompts, local, place, tokenizer, device, num_samples=cfg.num_samples,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p)
        mask = roll.completion_mask
        _sync(device)
        t1 = time.perf_counter()

        # 2. score: old and reference log-probs, values, rewards, advantages
        scored = score_rollout(m.policy_u, roll, ref_model=m.ref_model, ref_context=m.ref_context,
                               chunk_rows=cfg.score_chunk_rows, temperature=cfg.temperature, with_entropy=True,
                               with_full_kl=cfg.kl_estimator == "full")
        old_values = rollout_values(m.critic_u, m.policy_u, roll, cfg.score_chunk_rows) if m.critic is not None else None
        token_rewards = {name: lag_rewards(src.token_rewards(roll), cfg.lag) for name, (src, _) in sources.items()}
        kl = kl_penalty(scored["token_logps"], scored["ref_token_logps"], cfg.kl_estimator, mask,
                        full_kl=scored.get("full_kl"))
        rewards = dense_rewards(token_rewards, mask, scales=scales, kl=kl, kl_coef=cfg.kl_coef,
                                clip=cfg.reward_clip, normalize=normalize, running=running, gather=gather)
        advantages, returns = compute_advantages(cfg, rewards["penalized"], mask, old_values, acc)
        _sync(device)
        t2 = time.perf_counter()

        # 3. train
        m.policy.train()
        data = {"old_logps": scored["token_logps"], "advantages": advantages}
        if m.critic is not None:
            m.critic.train()
            data.update(old_values=old_values, returns=returns)
        update = ppo_update(cfg, run, state, m, roll, data, place)
        _sync(device)
        t3 = time.perf_counter()
        count_ppo_work(run.throughput, acc, mf, lora, roll, cfg.ppo_epochs, (t1 - t0, t2 - t1, t3 - t2))

        state.extra["running_reward"] = running.state_dict()
        metrics = {
            **reward_metrics(rewards, mask),
            "objective/kl": masked_sum(kl_k1(scored["token_logps"], scored["ref_token_logps"]), mask, dim=-1).mean(),
            "policy/entropy": _token_mean(scored["entropy"], mask, acc),
            **update,
            "response/length": mask.sum(dim=1).float().mean(),
            "response/truncated": roll.extras["truncated"].float().mean(),
            "time/generate": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2,
        }
        if judge is not None:
            metrics.update({k: v.mean() for k, v in judge_metrics(judge, roll).items()})
        return _mean_over_processes(metrics, acc)

    def postfix(metrics):
        shown = metrics.get(f"{judge.name}/reward", metrics["rewards/raw"]) if judge else metrics["rewards/raw"]
        return {"reward": f"{shown:.3f}", "kl": f"{metrics['objective/kl']:.3f}"}

    def evaluation(state):
        return evaluate(cfg, m, tokenizer, eval_prompts, sources, acc, state.step, judge)

    # a LoRA policy: merged in final/, the adapter in final/adapter/
    return loop.run_steps(run, t, len(prompts), step, tokenizer=tokenizer, desc=f"ppo ({cfg.estimator})",
                          postfix=postfix, evaluate=evaluation if eval_prompts is not None else None)


def _token_mean(x: torch.Tensor, mask: torch.Tensor, acc) -> torch.Tensor:
    """This process's share of the token mean over every process: ``Σ_local x · P / Σ_all tokens``, so that the
    mean over processes (:func:`_mean_over_processes`) is the token mean of the whole rollout batch."""
    tokens = mask.sum().float()
    if acc.num_processes > 1:
        tokens = acc.reduce(tokens.to(acc.device), reduction="sum")
    return masked_sum(x, mask) * acc.num_processes / tokens.clamp(min=1)


def _mean_over_processes(metrics: dict[str, Any], acc) -> dict[str, float]:
    values = torch.tensor([float(v) for v in metrics.values()], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        values = acc.reduce(values, reduction="mean")
    return dict(zip(metrics, values.tolist()))


# ----------------------------------------------------------------------------------------------- inputs and CLI


def load_inputs(cfg: PPOConfig):
    """Policy, tokenizer, training prompts and held-out prompts for ``cfg`` (``--model_name_or_path`` and
    ``--dataset_name``; the command line fills them with the built-in world's when no model is named). Any data set
    with a ``prompt`` column serves as prompts (other columns are ignored)."""
    return loop.load_inputs(cfg, "ppo needs --model_name_or_path and --dataset_name (prompts to train on); "
                            "with neither, `finegrain ppo` runs on the built-in world", kind="prompt")
