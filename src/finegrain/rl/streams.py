"""Named random streams for online RL: rollout groups and minibatch shuffles that do not depend on the process count.

A rollout batch is sampled in groups of prompts; with streams, group ``g`` of the batch at data position ``(epoch,
batch)`` draws from the generator seeded by ``(seed, "sample", epoch, batch, g)`` and its minibatch shuffle from
``(seed, "shuffle", epoch, batch, ppo_epoch, g)``. Its responses and minibatches therefore depend neither on the other
groups nor on the process that holds it: runs on any number of processes take the same update (docs/scaling.md).
Without streams everything draws from the global RNG, which every checkpoint saves and restores.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.nn.functional as F

from finegrain.types import CompletionBatch

__all__ = ["RolloutPlace", "concat_rollouts", "minibatch_rows", "sample_groups", "stream_seed"]


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed for the random stream named by ``parts`` (the run's seed, a purpose, a place in the data; the
    streams of ``ppo --generation_batch_size``, module docstring)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclasses.dataclass(frozen=True)
class RolloutPlace:
    """Where this process's share of one rollout batch sits in the run; it names the batch's random streams.

    Fields:
        seed: the run's ``--seed``.
        epoch, batch: the data position of the rollout batch (``RunState.epoch``, ``RunState.batch_in_epoch``).
        group_size: prompts per sampling group (``--generation_batch_size``, default this process's share).
        first_group: the rollout-batch index of this process's first group (groups are numbered over all
            processes, in rank order).
        streams: draw from named streams (``--generation_batch_size`` given); False: the global RNG, which every
            checkpoint saves and restores.
    """

    seed: int
    epoch: int
    batch: int
    group_size: int
    first_group: int
    streams: bool = True

    def generator(self, purpose: str, *more: int, device="cpu") -> torch.Generator | None:
        """The stream ``(seed, purpose, epoch, batch, *more)``, or None (the global RNG) without ``streams``."""
        if not self.streams:
            return None
        return torch.Generator(device=device).manual_seed(stream_seed(self.seed, purpose, self.epoch, self.batch, *more))


def _cat_padded(parts: list[torch.Tensor], width: int, value, left: bool = False) -> torch.Tensor:
    """Concatenate ``(n_i, w_i)`` tensors along rows after padding each to ``width`` columns with ``value``."""
    return torch.cat([F.pad(x, (width - x.shape[1], 0) if left else (0, width - x.shape[1]), value=value)
                      for x in parts])


def concat_rollouts(parts: list[CompletionBatch], pad_id: int) -> CompletionBatch:
    """Stack rollout batches: prompts left-padded and responses right-padded to common widths (pad id, mask 0).

    Per-row extras ``(n,)`` are concatenated; per-token extras ``(n, T)`` are right-padded with zeros."""
    if len(parts) == 1:
        return parts[0]
    p = max(b.prompt_input_ids.shape[1] for b in parts)
    t = max(b.completion_input_ids.shape[1] for b in parts)
    extras = {}
    for key, first in parts[0].extras.items():
        values = [b.extras[key] for b in parts]
        extras[key] = torch.cat(values) if first.dim() == 1 else _cat_padded(values, t, 0)
    texts = {key: None if any(getattr(b, key) is None for b in parts) else [x for b in parts for x in getattr(b, key)]
             for key in ("prompts", "responses")}
    return CompletionBatch(
        prompt_input_ids=_cat_padded([b.prompt_input_ids for b in parts], p, pad_id, left=True),
        prompt_attention_mask=_cat_padded([b.prompt_attention_mask for b in parts], p, 0, left=True),
        completion_input_ids=_cat_padded([b.completion_input_ids for b in parts], t, pad_id),
        completion_mask=_cat_padded([b.completion_mask for b in parts], t, False),
        extras=extras, **texts)


def sample_groups(policy, prompts, local: list[int], place: RolloutPlace, tokenizer, device, *, num_samples: int,
                  max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> CompletionBatch:
    """``num_samples`` responses to each prompt of ``local`` (this process's share of a rollout batch) from
    ``prompts`` (a :class:`~finegrain.data.CompletionData` of prompt rows), with their raw prompts and decoded texts.

    The prompts are sampled ``place.group_size`` at a time; with ``place.streams`` group ``g`` of the rollout batch
    is collated on its own and draws from its own stream (module docstring), so its responses do not depend on what
    was sampled before either (up to weights that differ in their last bits). Rows are prompt-major, as
    :func:`finegrain.rl.rollout.sample_rollouts` gives.
    """
    from finegrain.rewards.base import decode_responses
    from finegrain.rl.rollout import resolve_special_ids, sample_rollouts

    parts = []
    for k, lo in enumerate(range(0, len(local), place.group_size)):
        batch = prompts.collate(local[lo : lo + place.group_size]).to(device)
        roll = sample_rollouts(policy, batch.prompt_input_ids, batch.prompt_attention_mask,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               num_samples=num_samples, tokenizer=tokenizer,
                               generator=place.generator("sample", place.first_group + k, device=device))
        # the texts every reward source reads: the raw prompts (one per sample) and the responses, decoded once
        roll.prompts = [p for p in batch.prompts for _ in range(num_samples)]
        roll.responses = decode_responses(tokenizer, roll)
        parts.append(roll)
    return concat_rollouts(parts, resolve_special_ids(policy, tokenizer)[1])


def minibatch_rows(num_rows: int, place: RolloutPlace, num_samples: int, num_mini_batches: int,
                   ppo_epoch: int) -> list[torch.Tensor]:
    """The local rows of each minibatch of one pass (``ppo_epoch``) over the rollout.

    Every sampling group's ``group_size · num_samples`` rows are shuffled (with the group's own stream
    ``(seed, "shuffle", epoch, batch, ppo_epoch, g)`` when ``place.streams``, else the global RNG), and minibatch
    ``j`` takes the ``j``-th ``1/num_mini_batches`` of every group. As each process holds whole groups, a minibatch
    is the same set of rows whatever the number of processes, and every process holds the same number of its rows.
    """
    unit = place.group_size * num_samples
    chunks: list[list[torch.Tensor]] = [[] for _ in range(num_mini_batches)]
    for k in range(num_rows // unit):
        gen = place.generator("shuffle", ppo_epoch, place.first_group + k)
        perm = torch.randperm(unit, generator=gen) + k * unit
        for j, part in enumerate(perm.chunk(num_mini_batches)):
            chunks[j].append(part)
    return [torch.cat(c) for c in chunks]
