"""Sampling a chat model on prompt rows, resumably, with :func:`finegrain.rl.rollout.sample_prompts`.

Why finegrain's sampler and not ``model.generate``: on SmolLM2-135M (float32, greedy, batch 16, 160 new tokens, one
thread) both took the same time and gave identical tokens (docs/ifeval.md, "Sampling speed"), and the sampler draws
from a seeded ``torch.Generator`` per batch, so a resumed run samples exactly what an uninterrupted one would.

Prompts are rendered with the tokenizer's chat template as every finegrain command does, and a response is decoded
as :class:`finegrain.rewards.FunctionRewardSource` decodes it (``sample_prompts``). Each batch holds
``batch_size // num_samples`` prompts, each sampled ``num_samples`` times; batch ``b`` draws from
``torch.Generator().manual_seed(seed * 1_000_003 + b)``.

Resume: each finished batch is appended (one JSON line per prompt, flushed) to ``<out>.partial``; a restart skips
the batches already there and the file is renamed to ``<out>`` when the last batch is written, so ``<out>`` exists
only when complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finegrain.data.files import read_jsonl, write_jsonl

__all__ = ["SampleSettings", "sample_rows"]


@dataclass(frozen=True)
class SampleSettings:
    """How responses are drawn.

    Fields:
        num_samples: responses per prompt.
        max_new_tokens: the most tokens per response (EOS included).
        temperature: 0 for greedy decoding.
        top_p: nucleus mass (1: off).
        batch_size: rows (prompt x sample) per forward pass.
        seed: the seed of every batch's generator.
    """

    num_samples: int = 1
    max_new_tokens: int = 160
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    seed: int = 0


def sample_rows(model, tokenizer, rows: Sequence[dict], settings: SampleSettings, out_path: str | Path, *,
                reference=None, desc: str = "sampling", show_progress: bool = True) -> list[dict]:
    """Sample ``settings.num_samples`` responses to every row's prompt and write them to ``out_path`` (resumable).

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer (chat template, EOS, pad).
        rows: prompt rows with ``key`` and ``prompt`` (other fields are copied to the output).
        settings: :class:`SampleSettings`.
        out_path: the JSONL file to write; returned as it is when it already exists.
        reference: optional reference model; then each response also gets ``kl``, the sequential KL
            ``sum_t KL(pi(.|s_t) || pi_ref(.|s_t))`` over the full vocabulary at temperature 1
            (:func:`finegrain.rl.score_rollout` with ``with_full_kl``).
        desc: the progress bar's label.
        show_progress: show a progress bar.

    Returns:
        One row per prompt: the input row plus ``responses`` (texts), ``num_tokens`` (response tokens, EOS
        included), ``truncated`` (no EOS within ``max_new_tokens``), ``kl`` (with a reference) and ``seconds`` (the
        batch's sampling time, shared by its rows).
    """
    import torch
    from tqdm.auto import tqdm

    from finegrain.errors import DataError
    from finegrain.rl import score_rollout
    from finegrain.rl.rollout import sample_prompts

    out_path = Path(out_path)
    if out_path.is_file():
        return read_jsonl(out_path)
    for i, r in enumerate(rows):
        for field in ("key", "prompt"):
            if field not in r:
                raise DataError(f"missing field '{field}'", source=str(r.get("source", "prompt rows")), row=i,
                                field=field)
    partial = out_path.with_name(out_path.name + ".partial")
    done: dict[Any, dict] = {}
    if partial.is_file():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                break  # a line cut by a kill: that batch is sampled again
            done[row["key"]] = row
    per_batch = max(1, settings.batch_size // settings.num_samples)
    batches = [list(rows[i: i + per_batch]) for i in range(0, len(rows), per_batch)]
    device = next(model.parameters()).device
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("a", encoding="utf-8") as sink, \
            tqdm(total=len(rows), desc=desc, unit="prompt", disable=not show_progress) as bar:
        for b, batch_rows in enumerate(batches):
            if all(r["key"] in done for r in batch_rows):
                bar.update(len(batch_rows))
                continue
            start = time.perf_counter()
            generator = torch.Generator(device=device).manual_seed(settings.seed * 1_000_003 + b)
            roll = sample_prompts(model, tokenizer, [r["prompt"] for r in batch_rows],
                                  max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                  top_p=settings.top_p, num_samples=settings.num_samples, generator=generator)
            kl = None
            if reference is not None:
                scored = score_rollout(model, roll, ref_model=reference, with_full_kl=True)
                kl = (scored["full_kl"] * roll.completion_mask).sum(dim=1).tolist()
            texts = roll.responses
            lengths = roll.completion_mask.sum(dim=1).tolist()
            truncated = roll.extras["truncated"].cpu().tolist()
            seconds = round(time.perf_counter() - start, 3)
            k = settings.num_samples
            for i, r in enumerate(batch_rows):
                sl = slice(i * k, (i + 1) * k)
                row = dict(r, responses=texts[sl], num_tokens=lengths[sl], truncated=truncated[sl], seconds=seconds)
                if kl is not None:
                    row["kl"] = kl[sl]
                done[r["key"]] = row
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            bar.update(len(batch_rows))
    result = [done[r["key"]] for r in rows]
    write_jsonl(out_path, result)
    partial.unlink(missing_ok=True)
    return result
