"""``finegrain label contrastive``: T-REG's self-generated token rewards, computed once and stored with the pairs.

For every preference pair, the scorer model (the reference policy of the later preference training) reads the
chosen and the rejected response after two opposite prompts ``P+(x)`` and ``P−(x)`` and gives each response token

``r̂_t = σ(log π_ref(y_t | P+(x), y_<t) − log π_ref(y_t | P−(x), y_<t)) − ½  ∈ (−½, ½)``

(Zhou et al., ACL 2025, arXiv 2412.02685; docs/methods/treg.md). Every input row is written out with
``chosen_token_rewards`` and ``rejected_token_rewards`` added, one number per response token (:func:`label_pairs`).
The templates (:class:`~finegrain.rewards.contrastive.ContrastiveTemplate`), the output and examples:
docs/labeling.md, "finegrain label contrastive".
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal

from finegrain.config import check_ranges, option
from finegrain.errors import ConfigError

__all__ = ["ContrastiveLabelConfig", "label_pairs", "run_contrastive"]


@dataclasses.dataclass
class ContrastiveLabelConfig:
    """Token rewards by contrastive prompting (T-REG), stored as data-set columns."""

    model_name_or_path: str | None = option(None, "the scorer (the reference policy); default: the built-in world's SFT model")
    tokenizer_name_or_path: str | None = option(None, "tokenizer; default: the model's")
    dataset_name: str | None = option(None, "preference pairs (hub id, .jsonl/.json/.parquet/.csv); default: the world's pairs_train")
    dataset_split: str = option("train", "split of dataset_name")
    output_file: str | None = option(None, "JSONL to write; default: <dataset stem>.contrastive.jsonl in runs/label-contrastive/")
    overwrite: bool = option(False, "replace output_file if it exists")
    template: Literal["auto", "control", "system", "draft"] = option(
        "auto", "form of the opposite prompts: control (an instruction with {prompt}, or a prefix), system turn, or "
        "draft revision (the paper's); auto: draft (on the built-in world: control with its prefixes)")
    positive: str | None = option(None, "text of the positive instruction (default: the template's own)")
    negative: str | None = option(None, "text of the negative instruction (default: the template's own)")
    batch_size: int = option(16, "pairs per forward pass")
    max_length: int = option(512, "maximum prompt + response tokens (as in training); the template adds its own")
    max_prompt_length: int = option(256, "maximum prompt tokens; longer prompts keep their end")
    max_samples: int | None = option(None, "label only the first N rows")
    skip_invalid_rows: bool = option(False, "skip bad rows (counted and logged) instead of stopping")
    chunk_size: int = option(1024, "response positions per chunk of the output projection")
    device: str | None = option(None, "torch device; default: cuda when available, else cpu")
    trust_remote_code: bool = option(False, "allow models/tokenizers with custom code from the hub")

    def __post_init__(self) -> None:
        check_ranges(self, positive=("batch_size", "max_length", "max_prompt_length", "chunk_size"))
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                              f"({self.max_length})")
        if self.tokenizer_name_or_path and not self.model_name_or_path:
            raise ConfigError("--tokenizer_name_or_path needs --model_name_or_path")
        if self.model_name_or_path and not self.dataset_name:
            raise ConfigError("--model_name_or_path given without --dataset_name: say which pairs to label")


def label_pairs(source, data, *, batch_size: int, full_lengths: list[tuple[int, int]] | None = None,
                show_progress: bool = False) -> list[tuple[list[float], list[float]]]:
    """Contrastive token rewards of every pair of ``data``.

    Args:
        source: a :class:`~finegrain.rewards.contrastive.ContrastiveRewardSource`.
        data: a :class:`~finegrain.data.PreferenceData` (its examples keep the raw prompt and response texts).
        batch_size: pairs per forward pass.
        full_lengths: per pair, the untruncated ``(chosen, rejected)`` token counts; rewards of cut tokens are 0.
        show_progress: show a progress bar.

    Returns:
        Per pair ``(chosen_token_rewards, rejected_token_rewards)``, one float per response token.
    """
    from tqdm.auto import tqdm

    device = next(source.model.parameters()).device
    out: list[tuple[list[float], list[float]]] = []
    for lo in tqdm(range(0, len(data), batch_size), desc="contrastive rewards", disable=not show_progress):
        idx = list(range(lo, min(lo + batch_size, len(data))))
        batch = data.collate(idx).to(device)
        values = source.token_rewards(batch).values.cpu()  # the batch carries the raw prompts and texts
        for k, i in enumerate(idx):
            pair = []
            for side, (row, field) in enumerate(((k, "chosen"), (len(idx) + k, "rejected"))):
                n = len(data[i][f"{field}_input_ids"])
                cut = 0 if full_lengths is None else full_lengths[i][side] - n
                pair.append(values[row, :n].tolist() + [0.0] * cut)
            out.append((pair[0], pair[1]))
    return out


def run_contrastive(cfg: ContrastiveLabelConfig) -> Path:
    """Label the pairs of ``cfg`` and write the output JSONL; returns its path."""
    from finegrain.data.files import write_jsonl
    from finegrain.data.loading import load_rows
    from finegrain.data.prepared import PreferenceData
    from finegrain.data.tokenize import TokenLimits, tokenize_response
    from finegrain.models.build import freeze
    from finegrain.models.loading import load_causal_lm, load_tokenizer, resolve_device
    from finegrain.rewards.contrastive import ContrastiveRewardSource, checked_template, resolve_template

    if cfg.model_name_or_path is None or cfg.dataset_name is None:
        raise ConfigError("label contrastive needs --model_name_or_path (the scorer) and --dataset_name (pairs); with "
                          "neither, it labels the built-in world's pairs")
    out = Path(cfg.output_file) if cfg.output_file else (
        Path("runs/label-contrastive") / f"{Path(str(cfg.dataset_name)).stem or 'pairs'}.contrastive.jsonl")
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it or choose another --output_file")
    try:
        template = resolve_template(cfg.template, cfg.positive, cfg.negative)
    except ValueError as exc:
        raise ConfigError(f"--template/--positive/--negative: {exc}") from None

    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                               trust_remote_code=cfg.trust_remote_code)
    rows = load_rows(cfg.dataset_name, cfg.dataset_split)
    if cfg.max_samples is not None:
        rows = rows.head(cfg.max_samples)
    limits = TokenLimits(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    data = PreferenceData.from_source(rows, tokenizer, limits=limits, skip_invalid=cfg.skip_invalid_rows)
    if data.kind != "preference":
        raise ConfigError(f"{rows.source}: contrastive labels are for preference pairs (prompt, chosen, rejected); "
                          f"these rows are of kind '{data.kind}'")
    if len(data):
        checked_template(template, tokenizer, data[0]["prompt"], data[0]["rejected_text"],
                         options=("--template", "--positive", "--negative"))
    print(f"label contrastive: {template!r}", file=sys.stderr, flush=True)  # the template actually used
    # the model is loaded last: every check above fails in seconds, not after the model's loading time
    model = freeze(load_causal_lm(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code))
    model.to(resolve_device(cfg.device))
    sides = ("chosen", "rejected")
    full = [tuple(len(tokenize_response(tokenizer, ex[f"{f}_text"])[0]) if ex.get(f"{f}_truncated")
                  else len(ex[f"{f}_input_ids"]) for f in sides) for ex in data]
    cut = sum(bool(ex.get(f"{f}_truncated")) for ex in data for f in sides)
    source = ContrastiveRewardSource(model, tokenizer, template, chunk_size=cfg.chunk_size)
    rewards = label_pairs(source, data, batch_size=cfg.batch_size, full_lengths=full, show_progress=True)

    raw = {rows.locate(i): row for i, row in enumerate(rows)}
    write_jsonl(out, (dict(raw[(ex["source"], ex["row"])], chosen_token_rewards=chosen, rejected_token_rewards=rejected)
                      for ex, (chosen, rejected) in zip(data, rewards)), ensure_ascii=True)
    note = f"; {cut} responses were cut by max_length (their cut tokens have reward 0)" if cut else ""
    skipped = sum(data.skipped.values())
    print(f"contrastive rewards of {len(data)} pairs ({template.form} template) written to {out}"
          f"{f'; {skipped} rows skipped' if skipped else ''}{note}", file=sys.stderr)
    return out
