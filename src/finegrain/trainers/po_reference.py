"""The reference policy of ``finegrain po``: a frozen model or the LoRA policy with its adapter disabled, and the
one pass that precomputes its per-token log-probs (and contrastive token rewards) into a cache in the run directory.

``precompute_ref_log_probs`` runs the reference once over the data, keeps the per-token log-probs (so DPO and T-REG
both work; sequence sums derive from them) and, for T-REG with contrastive rewards, the rewards too (T-REG's
rewards from a reward spec are always computed once this way); both are cached
in ``RUN_DIR/ref_cache/`` under a fingerprint of the reference, the data and the settings, so a resumed run does not
recompute them. TDPO refuses it: its KL needs the reference's full distribution at every position.
"""

from __future__ import annotations

import array
import contextlib
import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from finegrain.models.forward import hidden_states, lm_head, predicting_states
from finegrain.ops.chunked import completion_stats
from finegrain.trainers.loop import eval_batches

if TYPE_CHECKING:
    from finegrain.trainers.po_config import Plan, POConfig

__all__ = ["Reference", "frozen_reference", "precompute_reference"]


class Reference:
    """The reference policy: a frozen model, or the (LoRA) policy run inside ``context`` (its adapter disabled).

    ``hidden(batch)`` gives the predicting states ``(N, T, H)`` without gradient; ``weight`` / ``bias`` its LM
    head (None when it shares the policy's frozen head, the LoRA case).
    """

    def __init__(self, model=None, *, policy=None, context=None, autocast=None):
        self.model, self.policy, self.context = model, policy, context
        self.autocast = autocast or contextlib.nullcontext
        self.weight = self.bias = None
        if model is not None:
            head = model.get_output_embeddings()
            self.weight, self.bias = head.weight, getattr(head, "bias", None)

    @property
    def scorer(self):
        return self.model if self.model is not None else self.policy

    def enter(self):
        return self.context() if self.model is None else contextlib.nullcontext()

    @torch.no_grad()
    def hidden(self, batch) -> torch.Tensor:
        with self.enter(), self.autocast():
            return predicting_states(hidden_states(self.scorer, batch), batch)


def frozen_reference(cfg: POConfig, model, ref_model, device):
    """The frozen reference model: the one given, ``ref_model_name_or_path``, or a copy of the policy's starting
    weights; None for a LoRA policy, whose reference is itself with the adapter disabled (no second copy)."""
    from finegrain.models.build import disable_dropout, freeze

    if ref_model is None and cfg.ref_model_name_or_path:
        from finegrain.models.loading import load_causal_lm

        ref_model = load_causal_lm(cfg.ref_model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    if ref_model is None and not cfg.use_peft:
        ref_model = copy.deepcopy(model)  # the starting weights, before any update
    if ref_model is None:
        return None
    disable_dropout(ref_model)
    return freeze(ref_model).to(device)


def _fingerprint(cfg: POConfig, data, plan: Plan, template) -> str:
    digest = hashlib.sha256()
    keys = ("ref_model_name_or_path", "model_name_or_path", "max_length", "max_prompt_length")
    digest.update(json.dumps({k: getattr(cfg, k) for k in keys} | {"plan": dataclasses.asdict(plan),
                                                                     "template": repr(template)}).encode())
    for ex in data:
        for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
            digest.update(array.array("q", ex[key]).tobytes())
    return digest.hexdigest()


def _pack(rows: list[list[float]]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    flat = torch.tensor([v for r in rows for v in r], dtype=torch.float32)
    return {"lengths": lengths, "values": flat}


def _unpack(blob: dict[str, torch.Tensor]) -> list[array.array]:
    out, start = [], 0
    values = blob["values"].numpy()
    for n in blob["lengths"].tolist():
        out.append(array.array("f", values[start : start + n].tobytes()))
        start += n
    return out


@torch.no_grad()
def precompute_reference(data, reference: Reference, plan: Plan, cfg: POConfig, acc, cache: Path,
                         contrastive=None, template=None, run=None) -> Plan:
    """Attach cached reference per-token log-probs (and token rewards) to every pair of ``data``.

    One pass of the reference over ``data`` (split over processes), unless ``cache`` holds the result for the same
    reference, data and settings. Token rewards come from ``contrastive``, any object with ``token_rewards(batch)``:
    the contrastive source (``plan.token_rewards == "contrastive"``) or a T-REG reward spec's mapped source
    (``"source"``); ``template`` is its description in the fingerprint. Afterwards batches carry
    ``extras["ref_token_logps"]`` (and ``token_rewards``), and the returned plan needs no reference model for them.
    """
    fields = (["ref_token_logps"] if plan.ref_logps else []) + (
        ["token_rewards"] if plan.token_rewards in ("contrastive", "source") else [])
    if not fields:
        return plan
    fp = _fingerprint(cfg, data, plan, template)
    blob = torch.load(cache, weights_only=True) if cache.is_file() else None
    if blob is None or blob.get("fingerprint") != fp:
        rows = {f"{side}_{name}": [None] * len(data) for side in ("chosen", "rejected") for name in fields}
        mine = list(range(len(data)))[acc.process_index :: acc.num_processes]
        for idx, batch in eval_batches(data, cfg.per_device_eval_batch_size, acc):
            values = {}
            if plan.ref_logps:
                h = reference.hidden(batch)
                w, b, cap = lm_head(reference.scorer)
                values["ref_token_logps"] = completion_stats(
                    h, reference.weight if reference.weight is not None else w, batch.completion_input_ids,
                    batch.completion_mask, policy_bias=reference.bias if reference.weight is not None else b,
                    compute_kl=False, chunk_size=cfg.chunk_size, logit_softcap=cap).token_logps
            if "token_rewards" in fields:
                values["token_rewards"] = contrastive.token_rewards(batch).values
            for name, v in values.items():
                v = v.float().cpu()
                for k, i in enumerate(idx):
                    for side, row in (("chosen", k), ("rejected", len(idx) + k)):
                        n = len(data[i][f"{side}_input_ids"])
                        rows[f"{side}_{name}"][i] = v[row, :n].tolist()
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            for col in rows.values():
                parts = gather_object([[(i, col[i]) for i in mine]])
                for part in parts:
                    for i, vals in part:
                        col[i] = vals
        blob = {"fingerprint": fp, **{key: _pack(col) for key, col in rows.items()}}
        if acc.is_main_process:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp")
            torch.save(blob, tmp)
            tmp.replace(cache)
        if run is not None:
            run.print(f"{' and '.join(fields)} computed for {len(data)} pairs of {data.source}; cached in {cache}")
    elif run is not None:
        run.print(f"{' and '.join(fields)} of {data.source} read from {cache}")
    for key in blob:
        if key == "fingerprint":
            continue
        for ex, vals in zip(data.examples, _unpack(blob[key])):
            ex[key] = vals
    return dataclasses.replace(plan, token_rewards="column" if "token_rewards" in fields else plan.token_rewards)
