"""``finegrain rm --level {sequence, sentence, token, discriminator}``: train a reward model at one granularity.

==============  ===========================================  ====================================================
level           data                                         loss per example (pair or row)
==============  ===========================================  ====================================================
sequence        pairs ``{prompt, chosen, rejected}``         Bradley–Terry ``−log σ(r_w − r_l)``
sentence        pairs                                        Bradley–Terry on ``R = Σ_j a_j s_j`` (docs/methods/reward-models.md)
token           revisions ``{prompt, rejected, revised}``     A: ``edit_weight·(−log σ(Σ_A r − Σ_D r)) +
                (edit labels computed on the fly); B also    seq_weight·BT(S_w, S_l)``; B: token classification
                takes token rows ``{prompt, response,        (docs/methods/token-rm.md); A with ``edit_weight 0``
                labels}`` (``finegrain label edits``); A     also trains on pairs (plain BT on ``S = Σ_t r_t``)
                with ``edit_weight 0`` also pairs
discriminator   revisions or token rows                      TLCR soft cross-entropy ``L_pos + L_neg`` (docs/methods/tlcr.md)
==============  ===========================================  ====================================================

With no model and no data set the command line runs it on the built-in world (:mod:`finegrain.world.app`): the
backbone starts from the world's SFT model, pairs are ``data/pairs_train.jsonl`` (held out: ``pairs_test.jsonl``),
revisions ``data/revisions.jsonl`` (held out: revisions of the test pairs by the world's reviser), and token credit
``data/credit_test.jsonl``. The data preparation lives in :mod:`finegrain.trainers.rm_data`.

The loop is :func:`finegrain.trainers.loop.fit`, as for sft and po: each optimizer step back-propagates
``Σ loss / global_batch_size`` over this process's micro-batches (times the number of processes, which DDP averages
away), so any process count and accumulation give the same update. Every ``eval_steps`` (and at the end) the main
process evaluates (:func:`evaluate`). The final model goes to ``RUN_DIR/final``
(:func:`finegrain.models.reward_model.load_reward_model` reads it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegrain.data.collate import pad_token_id
from finegrain.errors import ConfigError
from finegrain.trainers import loop
from finegrain.trainers.rm_config import RMConfig
from finegrain.trainers.rm_data import (
    credit_items,
    pair_examples,
    prepare_sentences,
    revision_examples,
    score_credit,
    token_examples,
)

__all__ = ["LEVELS", "RMConfig", "RMData", "build_model", "credit_items", "evaluate", "load_inputs",
           "pair_examples", "revision_examples", "score_credit", "token_examples", "train"]

LEVELS = ("sequence", "sentence", "token", "discriminator")


@dataclasses.dataclass
class RMData:
    """Everything a run needs: model, tokenizer, training examples and the evaluation sets.

    Fields:
        kind: ``pairs``, ``revisions`` or ``tokens`` (what ``train`` holds).
        train: tokenized examples; eval_pairs / eval_revisions / credit: evaluation sets or None.
    """

    model: Any
    tokenizer: Any
    kind: str
    train: list[dict]
    eval_pairs: list[dict] | None = None
    eval_revisions: list[dict] | None = None
    credit: list[dict] | None = None


# ----------------------------------------------------------------------------------------------- forward / loss


def collate_pairs(model, examples: list[dict], pad_id: int):
    """Chosen rows ``[0, B)`` then rejected rows ``[B, 2B)`` for the sequence / sentence / token models."""
    from finegrain.data.collate import collate_preferences
    from finegrain.models.reward_model import collate_sentence_examples

    if model.level == "sentence":
        return collate_sentence_examples([ex["chosen_srm"] for ex in examples] +
                                         [ex["rejected_srm"] for ex in examples], pad_id)
    keep = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    return collate_preferences([{k: ex[k] for k in keep} for ex in examples], pad_id)


def pair_losses(model, cfg: RMConfig, examples: list[dict], pad_id: int, device) -> tuple[torch.Tensor, dict]:
    """Bradley–Terry losses ``(B,)`` of a batch of pairs, and detached per-pair statistics."""
    from finegrain.losses.bt import bradley_terry_loss

    batch = collate_pairs(_unwrap(model), examples, pad_id).to(device)
    B = len(examples)
    out = model(batch)
    scale = None
    if model_level(model) == "sentence":
        scores = out.score
        if not cfg.weighted_sum:  # the SRM plain-sum ablation scales the logit by 1 / max(N_w, N_l)
            scale = 1.0 / torch.maximum(out.num_boundaries[:B], out.num_boundaries[B:]).to(scores.dtype)
    elif model_level(model) == "sequence":
        scores = out
    else:  # token levels: S(y) = Σ_t r_t from the same forward pass
        scores = _unwrap(model).token_values(batch, out).sum(dim=1)
    margin = torch.tensor([ex["margin"] for ex in examples], device=device) if "margin" in examples[0] else None
    bt = bradley_terry_loss(scores[:B], scores[B:], margin=margin, logit_scale=scale,
                            center_coef=cfg.center_rewards_coefficient, l2_coef=cfg.srm_l2_coef)
    return bt.losses, {"accuracy": bt.accuracies, "margin": bt.margins}


def _labelled_forward(model, rows: list[dict], pad_id: int, device):
    """Collate rows with ``token_labels`` and run ``model`` on them: ``(batch, out, labels, mask)``, where
    ``mask`` marks the labelled response tokens and unlabelled ones (EOS, padding) are neutral (label 0)."""
    from finegrain.data.collate import collate_completions

    batch = collate_completions(rows, pad_id).to(device)
    labels = batch.extras["token_labels"]
    mask = batch.completion_mask & (labels != -100)
    return batch, model(batch), torch.where(mask, labels, torch.zeros_like(labels)), mask


def revision_forward(model, cfg: RMConfig, examples: list[dict], pad_id: int, device) -> tuple[torch.Tensor, dict]:
    """Token RM / discriminator objective ``(B,)`` on revision pairs, plus the token rewards and labels."""
    from finegrain.losses.token_cls import minimal_edit_loss, tlcr_sequence_loss

    B = len(examples)
    rows = [{"prompt_input_ids": ex["prompt_input_ids"], "completion_input_ids": ex[f"{side}_input_ids"],
             "token_labels": ex[f"{side}_labels"]} for side in ("revised", "rejected") for ex in examples]
    with_chosen = [i for i, ex in enumerate(examples) if cfg.seq_pairs == "chosen" and ex.get("chosen_input_ids")]
    use_chosen = model_level(model) == "token" and cfg.objective == "edit_bt" and cfg.seq_weight > 0 and with_chosen
    if use_chosen:
        rows += [{"prompt_input_ids": examples[i]["prompt_input_ids"],
                  "completion_input_ids": examples[i]["chosen_input_ids"],
                  "token_labels": [0] * len(examples[i]["chosen_input_ids"])} for i in with_chosen]
    batch, out, labels, mask = _labelled_forward(model, rows, pad_id, device)
    values = _unwrap(model).token_values(batch, out)
    if model_level(model) == "discriminator":
        pos = tlcr_sequence_loss(out[:B], labels[:B], mask[:B], hard=cfg.hard_labels)
        neg = tlcr_sequence_loss(out[B : 2 * B], labels[B : 2 * B], mask[B : 2 * B], hard=cfg.hard_labels)
        losses = pos + neg
    else:
        full = batch.completion_mask
        chosen_scores = None
        if cfg.objective == "edit_bt":
            chosen_scores = values[:B].sum(dim=1)
            if use_chosen:
                idx = torch.as_tensor(with_chosen, device=device)
                chosen_scores = chosen_scores.index_copy(0, idx, values[2 * B :].sum(dim=1))
        use = full if cfg.objective == "edit_bt" else mask  # A sums over the whole response, B averages labelled tokens
        res = minimal_edit_loss(out[:B], labels[:B], use[:B], out[B : 2 * B], labels[B : 2 * B], use[B : 2 * B],
                                objective=cfg.objective, chosen_scores=chosen_scores, seq_weight=cfg.seq_weight,
                                cls_loss=cfg.cls_loss, edit_weight=cfg.edit_weight)
        losses = res.losses
    stats = {"values": values[: 2 * B].detach(), "labels": labels[: 2 * B], "mask": mask[: 2 * B]}
    return losses, stats


def token_row_losses(model, cfg: RMConfig, examples: list[dict], pad_id: int, device) -> tuple[torch.Tensor, dict]:
    """Per-row losses ``(N,)`` on token rows (labels given): TLCR cross-entropy or objective B."""
    from finegrain.losses.token_cls import tlcr_sequence_loss
    from finegrain.ops.masked import masked_mean

    keep = ("prompt_input_ids", "completion_input_ids", "token_labels")
    rows = [{k: ex[k] for k in keep} for ex in examples]
    batch, out, labels, mask = _labelled_forward(model, rows, pad_id, device)
    if model_level(model) == "discriminator":
        losses = tlcr_sequence_loss(out, labels, mask, hard=cfg.hard_labels)
    elif cfg.cls_loss == "ce":  # classes (−1, 0, +1) at indices (0, 1, 2)
        logp = torch.log_softmax(out.float(), dim=-1).gather(-1, (labels + 1).unsqueeze(-1)).squeeze(-1)
        losses = masked_mean(-logp, mask, dim=-1)
    else:
        losses = masked_mean((out - labels.to(out.dtype)) ** 2, mask, dim=-1)
    values = _unwrap(model).token_values(batch, out).detach()
    return losses, {"values": values, "labels": labels, "mask": mask}


def _unwrap(model):
    return getattr(model, "module", model)  # DDP


def model_level(model) -> str:
    return _unwrap(model).level


def example_losses(model, cfg: RMConfig, kind: str, examples: list[dict], pad_id: int, device):
    """Per-example losses and statistics of one micro-batch, for the data kind of the run."""
    if kind == "pairs":
        return pair_losses(model, cfg, examples, pad_id, device)
    if kind == "revisions":
        return revision_forward(model, cfg, examples, pad_id, device)
    return token_row_losses(model, cfg, examples, pad_id, device)


def _edit_accuracy(stats: dict) -> torch.Tensor:
    """Sign accuracy of the token rewards on changed tokens: ``r > 0`` on +1 tokens, ``r < 0`` on −1.

    The ``edit_accuracy`` of docs/methods/token-rm.md."""
    on = stats["mask"] & (stats["labels"] != 0)
    right = (torch.sign(stats["values"]) == stats["labels"].to(stats["values"].dtype)) & on
    return right.sum().float() / on.sum().clamp(min=1).float()


# ------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, cfg: RMConfig, data: RMData, device) -> dict[str, float]:
    """Held-out metrics (main process): pairwise ``accuracy`` / ``margin`` on held-out pairs (per ``subset`` when the
    rows have one, RewardBench style), token-credit ``auroc`` / ``precision_at_k`` of the model's token rewards (as
    :mod:`finegrain.rewards.models` produces them) against ground truth, and for the token levels the held-out edit
    metrics ``edit_accuracy`` / ``edit_auroc`` and the objective as ``loss``."""
    from finegrain.eval.metrics import evaluate_token_credit
    from finegrain.rewards.models import make_reward_source

    core = _unwrap(model)
    core.eval()
    pad_id = pad_token_id(data.tokenizer)
    bs = cfg.per_device_eval_batch_size
    metrics: dict[str, float] = {}
    if data.eval_pairs:
        acc, margins, losses, subsets = [], [], [], []
        for lo in range(0, len(data.eval_pairs), bs):
            part = data.eval_pairs[lo : lo + bs]
            loss, stats = pair_losses(core, cfg, part, pad_id, device)
            acc += stats["accuracy"].tolist()
            margins += stats["margin"].tolist()
            losses += loss.tolist()
            subsets += [ex.get("subset") for ex in part]
        metrics.update(accuracy=float(np.mean(acc)), margin=float(np.mean(margins)))
        metrics["bt_loss" if core.level in ("token", "discriminator") else "loss"] = float(np.mean(losses))
        for name in sorted({s for s in subsets if s is not None}):
            metrics[f"accuracy/{name}"] = float(np.mean([a for a, s in zip(acc, subsets) if s == name]))
    if data.eval_revisions and core.level in ("token", "discriminator"):
        losses, scores, credit, right, on = [], [], [], 0.0, 0
        for lo in range(0, len(data.eval_revisions), bs):
            loss, stats = revision_forward(core, cfg, data.eval_revisions[lo : lo + bs], pad_id, device)
            losses += loss.tolist()
            n_on = int((stats["mask"] & (stats["labels"] != 0)).sum())
            right += float(_edit_accuracy(stats)) * n_on
            on += n_on
            for v, y, m in zip(stats["values"].double().cpu().numpy(), stats["labels"].cpu().numpy(),
                               stats["mask"].cpu().numpy()):
                scores.append(v[m])
                credit.append(y[m].astype(np.float64))
        metrics.update(loss=float(np.mean(losses)), edit_accuracy=right / max(on, 1),
                       edit_auroc=evaluate_token_credit(scores, credit).auroc)
    if data.credit and core.level != "sequence":
        options = {"spread": cfg.spread} if core.level == "sentence" else {}
        source = make_reward_source(core, core.tokenizer, batch_size=bs, **options)
        reduce = "sum" if core.level == "token" else "mean"
        scores, credit = score_credit(source, data.credit, pad_id, reduce=reduce, batch_size=bs)
        res = evaluate_token_credit(scores, credit)
        metrics.update(auroc=res.auroc, precision_at_k=res.precision_at_k)
    core.train()
    return metrics


# ------------------------------------------------------------------------------------------------------- train


def train(cfg: RMConfig, data: RMData) -> Path:
    """Train the reward model of ``data`` and return the run directory (``final/`` holds the model)."""
    from finegrain.models.reward_model import save_reward_model

    acc = loop.make_accelerator(cfg)
    tokenizer, kind = data.tokenizer, data.kind
    method = f"{cfg.level}-rm" if cfg.level != "discriminator" else "tlcr-discriminator"
    run = loop.Run(cfg, "rm", method, acc)
    t = loop.prepare(run, data.model, len(data.train))
    model, num_processes, pad_id = t.model, acc.num_processes, pad_token_id(tokenizer)

    def step(indices):
        sums = torch.zeros(3, device=acc.device)  # loss, accuracy, margin (sums over examples)
        for mb in loop.micro_steps(run, model, indices):
            if not mb:
                continue
            losses, stats = example_losses(model, cfg, kind, [data.train[i] for i in mb], pad_id, acc.device)
            # DDP averages gradients over processes; multiplying by their number keeps the global mean
            acc.backward(losses.sum() * num_processes / len(indices))
            sums[0] += losses.detach().sum()
            if "accuracy" in stats:
                sums[1] += stats["accuracy"].sum()
                sums[2] += stats["margin"].sum()
            else:
                sums[1] += _edit_accuracy(stats) * len(mb)
        if num_processes > 1:
            sums = acc.reduce(sums, reduction="sum")
        metrics = {"loss": sums[0] / len(indices),
                   "accuracy" if kind == "pairs" else "edit_accuracy": sums[1] / len(indices)}
        if kind == "pairs":
            metrics["margin"] = sums[2] / len(indices)
        return metrics["loss"], metrics

    def save_final(state):
        full = acc.get_state_dict(model) if num_processes > 1 else None
        if run.is_main:
            save_reward_model(acc.unwrap_model(model), run.dir / "final", state_dict=full,
                              extra={"trained_with": {"level": cfg.level, "steps": state.step, "kind": kind}})
        acc.wait_for_everyone()

    return loop.fit(run, t, data.train, step, tokenizer=tokenizer, desc=f"rm {cfg.level}",
                    evaluate=lambda state: _evaluate_and_log(run, model, cfg, data, state),
                    save_final=save_final, flops_of=acc.unwrap_model(model).backbone, lm_head=False)


def _evaluate_and_log(run, model, cfg: RMConfig, data: RMData, state) -> None:
    if not (data.eval_pairs or data.eval_revisions or data.credit):
        return
    if run.is_main:
        metrics = evaluate(model, cfg, data, run.accelerator.device)
        run.log(metrics, state, split="eval")
        run.print(f"step {state.step} eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    run.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------- inputs


def build_model(cfg: RMConfig, backbone, tokenizer, *, splitter: str | None = None):
    """A fresh reward model of ``cfg.level`` on ``backbone`` (dropout off, LoRA and checkpointing as configured).

    ``splitter`` names the sentence splitter when ``cfg.splitter`` is not set (default ``rule``). Every random
    draw of the set-up (the inserted ``<END>`` token's embedding row, the head, LoRA's initial ``A``) comes from
    ``cfg.seed``, so one seed gives one model in every process and run: torch seeds its global RNG at random when
    it starts, and this runs before the training loop seeds it.
    """
    from finegrain.models.build import apply_lora, disable_dropout
    from finegrain.models.reward_model import build_reward_model, input_embedding_name, make_splitter

    if cfg.disable_dropout:
        disable_dropout(backbone)
    name = cfg.splitter or splitter or "rule"
    splitter = make_splitter({"name": "sat", "model": cfg.sat_model} if name == "sat" else {"name": name})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_reward_model(
            cfg.level, backbone, tokenizer, num_outputs=3 if cfg.objective == "token_cls" and cfg.cls_loss == "ce" else 1,
            embed_dim=cfg.reward_embed_dim, max_sentences=cfg.max_sentences, weighted_sum=cfg.weighted_sum,
            boundary_mode=cfg.boundary_mode, splitter=splitter, double_softmax=cfg.double_softmax, lag=cfg.lag,
            score_bias=cfg.score_bias, seed=cfg.seed,
        )
        if cfg.gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable()
        if cfg.use_peft:
            # the inserted <END> token has a fresh embedding row: the embedding must train too
            save = [input_embedding_name(model.backbone)] if cfg.level == "sentence" and cfg.boundary_mode == "insert" else None
            model.backbone = apply_lora(model.backbone, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                        cfg.lora_target_modules, modules_to_save=save)
    return model


def load_inputs(cfg: RMConfig) -> RMData:
    """Model, tokenizer and data for ``cfg`` (``--model_name_or_path`` as the backbone, ``--dataset_name`` and the
    evaluation sets; the command line fills them with the built-in world's when no model is named)."""
    from finegrain.data.loading import load_rows
    from finegrain.models.loading import load_causal_lm, load_tokenizer

    if cfg.model_name_or_path is None or cfg.dataset_name is None:
        raise ConfigError("rm needs --model_name_or_path (the backbone) and --dataset_name (pairs, or revisions for the "
                          "token levels); with neither, `finegrain rm` trains on the built-in world")
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                               trust_remote_code=cfg.trust_remote_code)
    # every data set is read before the backbone is loaded (which takes longest): a missing file, split or column
    # is reported in seconds
    for source, split in ((cfg.dataset_name, cfg.dataset_split), (cfg.eval_dataset_name, cfg.eval_split),
                          (cfg.eval_revisions_name, None), (cfg.credit_dataset_name, None)):
        if source is not None:
            load_rows(source, split)
    kind = _train_kind(cfg, cfg.dataset_name)
    backbone = load_causal_lm(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    # before tokenizing: insert mode adds <END> to the tokenizer
    model = build_model(cfg, backbone, tokenizer)
    skip = cfg.skip_invalid_rows
    load = {"pairs": pair_examples, "revisions": revision_examples, "tokens": token_examples}[kind]
    train_ex = load(cfg.dataset_name, tokenizer, cfg, split=cfg.dataset_split, limit=cfg.max_train_samples, skip=skip)
    eval_pairs = None
    if cfg.eval_dataset_name is not None:
        eval_pairs = pair_examples(cfg.eval_dataset_name, tokenizer, cfg, split=cfg.eval_split,
                                   limit=cfg.max_eval_samples, skip=skip)
    eval_revs = None
    if cfg.eval_revisions_name is not None and cfg.level in ("token", "discriminator"):
        eval_revs = revision_examples(cfg.eval_revisions_name, tokenizer, cfg, split=None, limit=cfg.max_eval_samples,
                                      skip=skip)
    credit = None
    if cfg.credit_dataset_name is not None and cfg.level != "sequence":
        credit = credit_items(cfg.credit_dataset_name, tokenizer, cfg, limit=cfg.max_credit_samples, skip=skip)
    if cfg.level == "sentence":
        prepare_sentences(model, train_ex, ("chosen", "rejected"))
        prepare_sentences(model, eval_pairs or [], ("chosen", "rejected"))
    return RMData(model, tokenizer, kind, train_ex, eval_pairs, eval_revs, credit)


def _train_kind(cfg: RMConfig, source: Any) -> str:
    """``pairs`` for sequence/sentence; ``revisions`` or ``tokens`` (by the columns) for the token levels."""
    if cfg.level in ("sequence", "sentence"):
        return "pairs"
    from finegrain.data.loading import load_rows
    from finegrain.data.schema import detect_kind

    found = detect_kind(load_rows(source, cfg.dataset_split).column_names)
    if found == "revision":
        return "revisions"
    if found == "preference" and cfg.level == "token" and cfg.objective == "edit_bt" and cfg.edit_weight == 0:
        return "pairs"  # plain Bradley-Terry on the summed token rewards
    if found == "token":
        if cfg.level == "token" and cfg.objective == "edit_bt":
            raise ConfigError("--objective edit_bt needs revision rows {prompt, rejected, revised} (it pairs each "
                              "rejected response with its revision); token rows need --objective token_cls")
        return "tokens"
    plain = (" (or, with --objective edit_bt --edit_weight 0, on preference pairs)" if cfg.level == "token" else "")
    raise ConfigError(f"--level {cfg.level} trains on revision rows {{prompt, rejected, revised}} or token rows "
                      f"{{prompt, response, labels|spans}}{plain}; the data set has rows of kind '{found}'")
