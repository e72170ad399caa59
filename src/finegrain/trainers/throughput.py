"""Throughput in every training log: step time, tokens per second, model-FLOPs utilisation (MFU).

A trainer times each phase of a step (the whole step for sft / po / rm; rollout, score and update apart for ppo)
and tells the :class:`Throughput` meter how many non-padding tokens that work processed and how many model FLOPs it
needed (:class:`finegrain.models.flops.ModelFlops`). At each log line the meter reports ``perf/<phase>step_time``,
``perf/<phase>tokens_per_second`` and ``perf/<phase>mfu`` (the peak: :func:`finegrain.models.flops.device_peak_flops`)
since the previous line; docs/run-directory.md, "Throughput", defines them and the FLOP convention.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from finegrain.models.flops import ModelFlops, device_peak_flops, model_flops

__all__ = ["Throughput", "count_ppo_work", "decode_flops", "example_work", "flops_model", "lora_weights", "row_lengths"]


def flops_model(model) -> ModelFlops:
    """The :class:`ModelFlops` of a (possibly wrapped: DDP, peft) causal LM."""
    inner = getattr(model, "module", model)
    get_base = getattr(inner, "get_base_model", None)
    return model_flops(get_base() if callable(get_base) else inner)


def lora_weights(model) -> int | None:
    """The number of LoRA adapter weights of a peft model (None for a model without adapters)."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "peft_config"):
        return None
    return int(sum(p.numel() for name, p in inner.named_parameters() if "lora_" in name))


def example_work(mf: ModelFlops, examples: Iterable[dict], *, lm_head: bool = True, lora: int | None = None,
                 reference: bool = False) -> tuple[int, float]:
    """Non-padding tokens and training FLOPs of tokenized examples (one row per response: the prompt's tokens plus
    the response's, as the data layer tokenizes them; pairs and revisions count both responses).

    ``lm_head``: the LM head runs at the response positions (sft, po); False for reward models (their heads are a
    few weights). ``lora``: adapter weights when only LoRA adapters train (:meth:`ModelFlops.train`). ``reference``:
    a frozen reference model of the same shape also reads every row (one forward, its LM head at the response
    positions: po's live reference, a copy or the LoRA policy with its adapter disabled).
    """
    tokens, flops = 0, 0.0
    for ex in examples:
        prompt = len(ex.get("prompt_input_ids") or [])
        for key, ids in ex.items():
            if key.endswith("_input_ids") and key != "prompt_input_ids" and ids is not None:
                n, h = prompt + len(ids), len(ids) if lm_head else 0
                tokens += n
                flops += mf.train(n, h, lora_params=lora) + (mf.forward(n, h) if reference else 0.0)
    return tokens, flops


def row_lengths(batch) -> tuple[list[int], list[int]]:
    """Per row of a :class:`~finegrain.types.CompletionBatch`: the non-padding tokens (prompt + response) and the
    response tokens."""
    prompt = batch.prompt_attention_mask.to(torch.bool).sum(dim=1)
    response = batch.completion_mask.to(torch.bool).sum(dim=1)
    return (prompt + response).tolist(), response.tolist()


def decode_flops(mf: ModelFlops, prompt_len: int, new_tokens: int) -> float:
    """FLOPs of sampling ``new_tokens`` after a ``prompt_len``-token prompt with a KV cache: the prefill (the head at
    the last position only) and one decode step per further token, ``Σ_t 2N + 4 L d (P + t)``."""
    if new_tokens <= 0:
        return 0.0
    prefill = mf.forward(prompt_len, head_positions=1)
    return prefill + sum(mf.decode(prompt_len + t) for t in range(1, new_tokens))


@dataclass
class _Window:
    seconds: float = 0.0
    tokens: int = 0
    flops: float = 0.0
    steps: int = 0


class Throughput:
    """Accumulates timed work per phase and reports it (module docstring).

    Args:
        device: the device the work runs on (its peak is measured, or read from a data sheet, at the first report,
            not while a step is being timed).
        dtype: the dtype the work runs in.
        devices: how many devices the counted work is spread over (the peak is per device).
    """

    def __init__(self, device="cpu", dtype=None, devices: int = 1):
        self.device, self.dtype, self.devices = device, dtype, devices
        self._peak: tuple[float, str] | None = None
        self._window: dict[str, _Window] = {}
        self._total: dict[str, _Window] = {}
        self.last_rate = 0.0

    @property
    def peak(self) -> tuple[float, str]:
        """``(FLOP/s of all devices, where the figure comes from)``."""
        if self._peak is None:
            flops, source = device_peak_flops(self.device, self.dtype)
            self._peak = (flops * self.devices, source + (f" x {self.devices} processes" if self.devices > 1 else ""))
        return self._peak

    def add(self, seconds: float, tokens: int, flops: float, phase: str = "", steps: int = 1) -> None:
        """Record ``seconds`` of work on ``tokens`` non-padding tokens needing ``flops`` model FLOPs (``steps``
        optimizer steps' worth)."""
        self.last_rate = tokens / seconds if seconds > 0 else 0.0  # the progress bar shows the latest step's
        for store in (self._window, self._total):
            w = store.setdefault(phase, _Window())
            w.seconds += seconds
            w.tokens += int(tokens)
            w.flops += float(flops)
            w.steps += steps

    def _figures(self, phases: Iterable[tuple[str, _Window]]) -> dict[str, float]:
        out = {}
        for phase, w in phases:
            if w.seconds <= 0 or w.steps == 0:
                continue
            prefix = f"perf/{phase}_" if phase else "perf/"
            out[f"{prefix}step_time"] = w.seconds / w.steps
            out[f"{prefix}tokens_per_second"] = w.tokens / w.seconds
            out[f"{prefix}mfu"] = w.flops / w.seconds / self.peak[0]
        return out

    def report(self) -> dict[str, float]:
        """The figures since the last report (then start a new window)."""
        out = self._figures(self._window.items())
        self._window = {}
        return out

    def totals(self) -> dict[str, float]:
        """The figures over the whole run (empty when nothing was recorded)."""
        return self._figures(self._total.items())


def count_ppo_work(meter: Throughput, acc, mf: ModelFlops, lora: int | None, roll, ppo_epochs: int,
                   seconds: tuple[float, float, float]) -> None:
    """Tell ``meter`` the work of one PPO step, over all processes: the rollout (sampling each
    response with the KV cache), the scoring (policy and reference forwards) and the update (``ppo_epochs`` passes of
    training). FLOPs are the policy's (the critic's are not counted, so MFU errs low)."""
    total, response = row_lengths(roll)
    work = [sum(response), sum(decode_flops(mf, n - t, t) for n, t in zip(total, response)),
            sum(total), sum(2 * mf.forward(n, t) for n, t in zip(total, response)),
            ppo_epochs * sum(total), ppo_epochs * sum(mf.train(n, t, lora_params=lora) for n, t in zip(total, response))]
    work = torch.tensor(work, dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        work = acc.reduce(work, reduction="sum")
    w = work.tolist()
    for phase, (tokens, flops), secs in zip(("rollout", "score", "update"), zip(w[0::2], w[1::2]), seconds):
        meter.add(secs, int(tokens), flops, phase=phase)
