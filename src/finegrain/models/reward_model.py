"""Reward models at three granularities on any Hugging Face causal-LM backbone, and their save/load format.

Every model wraps a causal LM (its final hidden states come from :func:`finegrain.models.forward.hidden_states`,
through the model's own forward, so DDP and PEFT wrappers see the call) and one head from
:mod:`finegrain.models.heads`:

======================  =================================  ============================================================
class                   head                               output on a batch (prompt block ``P``, response block ``T``)
======================  =================================  ============================================================
SequenceRewardModel     ``ScalarHead`` (no bias)           ``(N,)`` score ``v`` at the last response token
                                                           (Bradley–Terry baseline, Ouyang et al. 2022)
SentenceRewardModel     ``SentenceRewardHead``             :class:`~finegrain.models.heads.SentenceRewardOutput`:
                                                           ``R = Σ_j a_j s_j`` over the sentence boundaries
                                                           (Qiu et al. 2025; docs/methods/reward-models.md)
TokenRewardModel        ``ScalarHead`` (or 3-way linear)   ``(N, T)`` ``r_φ(x, y_≤t)`` on the states after reading
                                                           each token (Xu et al., ACL 2024; docs/methods/token-rm.md)
TokenDiscriminator      ``TwoClassHead``                   ``(N, T, 2)`` logits; reward ``2·P(+) − 1``
                                                           (TLCR, Yoon et al. 2024; docs/methods/tlcr.md)
======================  =================================  ============================================================

Sentence boundaries (SRM's segmentation, docs/methods/reward-models.md) come from a pluggable splitter
(:class:`~finegrain.data.segmentation.RuleSplitter` by default, SaT optional) mapped onto tokens through
character offsets, in one of two modes:

* ``"insert"``: an ``<END>`` token is added to the tokenizer (embedding matrix resized to a multiple of 8) and
  inserted after the prompt and after every sentence (the SRM training layout);
* ``"mark"``: no new token; the last prompt token and the last token of every sentence are the boundaries.

Saved directory (:func:`save_reward_model` / :func:`load_reward_model`)::

    DIR/config.json, DIR/model.safetensors, tokenizer files   the backbone (save_pretrained; LoRA merged)
    DIR/reward_head.safetensors                               the head's weights
    DIR/finegrain_reward.json                                 level, head config, splitter, boundary mode, ...

``RewardModel.save_pretrained`` writes the whole module as one flat safetensors file instead; the training loop's
resumable checkpoints use it (:func:`finegrain.trainers.loop.Run.save_checkpoint`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finegrain.data.segmentation import (
    RuleSplitter,
    SaTSplitter,
    SentenceSplitter,
    insert_end_tokens,
    mark_sentence_ends,
    sentence_token_ends,
)
from finegrain.errors import ConfigError, DataError
from finegrain.models.build import is_peft_model, save_merged_lora
from finegrain.models.forward import hidden_states, reading_states
from finegrain.models.heads import ScalarHead, SentenceRewardHead, SentenceRewardOutput, TwoClassHead
from finegrain.models.loading import REWARD_MODEL_FILE
from finegrain.ops.masked import last_token_index
from finegrain.types import CompletionBatch

__all__ = [
    "BOUNDARY_MODES",
    "CONFIG_FILE",
    "END_TOKEN",
    "LEVELS",
    "PunctuationSplitter",
    "RewardModel",
    "SentenceExample",
    "SentenceRewardModel",
    "SequenceRewardModel",
    "TokenDiscriminator",
    "TokenRewardModel",
    "build_reward_model",
    "collate_sentence_examples",
    "is_reward_model_dir",
    "load_reward_model",
    "make_splitter",
    "save_reward_model",
]

LEVELS: tuple[str, ...] = ("sequence", "sentence", "token", "discriminator")
BOUNDARY_MODES: tuple[str, ...] = ("insert", "mark")
CONFIG_FILE = REWARD_MODEL_FILE
HEAD_FILE = "reward_head.safetensors"
FLAT_FILE = "reward_model.safetensors"
END_TOKEN = "<END>"
FORMAT = 1


class RewardModel(nn.Module):
    """Common part of the four reward models: a causal-LM backbone, a head, the tokenizer and the settings.

    Args:
        backbone: a Hugging Face ``AutoModelForCausalLM`` (or its PEFT wrapper).
        tokenizer: its fast tokenizer (saved with the model; not a module).
        head: the reward head.

    Subclasses define ``forward(batch)`` (what training differentiates), :meth:`score` (one number per row, for
    pairwise accuracy) and :meth:`settings` (what ``finegrain_reward.json`` records besides the head).
    """

    level: ClassVar[str] = ""

    def __init__(self, backbone: nn.Module, tokenizer: Any, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer

    # -- shared pieces ------------------------------------------------------------------------------------------

    def hidden(self, batch: CompletionBatch) -> torch.Tensor:
        """Final hidden states ``(N, P+T, H)`` cast to the head's dtype."""
        h = hidden_states(self.backbone, batch)
        return h.to(next(self.head.parameters()).dtype)

    def head_config(self) -> dict[str, Any]:
        """Constructor arguments of the head (recorded in ``finegrain_reward.json``)."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Level-specific settings recorded in ``finegrain_reward.json`` (besides the head config)."""
        return {}

    def score(self, batch: CompletionBatch) -> torch.Tensor:
        """One score per row, ``(N,)``: what pairwise accuracy compares."""
        raise NotImplementedError

    # -- flat checkpoint (the training loop's resumable state) -------------------------------------------------

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        safe_serialization: bool = True, **_: Any) -> None:
        """Write the whole module as one flat safetensors file (``reward_model.safetensors``) in ``path``.

        This is the layout of resumable checkpoints (keys = this module's ``state_dict`` keys; a tensor shared by
        tied weights is stored once). The loadable directory of a finished model is written by
        :func:`save_reward_model`.
        """
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ConfigError("reward models are saved as safetensors only")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state_dict = self.state_dict() if state_dict is None else state_dict
        save_file(_dedup_tied(state_dict), str(path / FLAT_FILE))


def _dedup_tied(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one key per storage; tied output embeddings (``*lm_head.weight``) are the copies dropped."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    # lm_head keys last, so the embedding (which loads first) is the one kept
    for key in sorted(state_dict, key=lambda k: k.endswith("lm_head.weight")):
        t = state_dict[key]
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if ident in seen and t.numel():
            continue
        seen[ident] = key
        out[key] = t.detach().contiguous().cpu()
    return out


# ------------------------------------------------------------------------------------------------------ levels


class SequenceRewardModel(RewardModel):
    """Sequence-level Bradley–Terry reward model: ``r(x, y) = w·h_last`` (docs/methods/reward-models.md).

    ``h_last`` is the state after reading the last response token (EOS when the response has one), so the score
    sees the whole response; a row with an empty response is read at its last prompt token. The head has no bias by
    default (TRL's score head has none): the Bradley–Terry loss depends only on ``r_w − r_l``, so a bias ``b`` gets
    no gradient but rounding noise, which Adam's normalisation turns into steps of size ~lr. The head with ``b``
    (``bias=True`` in ``finegrain_reward.json``; saved models from before the bias-free default, whose head
    config has no ``bias`` entry) still loads.
    """

    level = "sequence"

    def head_config(self) -> dict[str, Any]:
        return {"hidden_size": self.head.proj.in_features, "bias": self.head.proj.bias is not None}

    def forward(self, batch: CompletionBatch) -> torch.Tensor:
        """Scores ``(N,)``."""
        h = self.hidden(batch)
        P = batch.prompt_input_ids.shape[1]
        index = P + last_token_index(batch.completion_mask)  # -1 (empty response) -> the last prompt column
        rows = h.gather(1, index.view(-1, 1, 1).expand(-1, 1, h.shape[-1])).squeeze(1)
        return self.head(rows)

    def score(self, batch: CompletionBatch) -> torch.Tensor:
        return self.forward(batch)


class TokenRewardModel(RewardModel):
    """Token-level reward model ``r_φ(x, y_≤t)`` on every response position (docs/methods/token-rm.md).

    With ``num_outputs=1`` (objective A, and B with MSE) the head is a :class:`ScalarHead` and the token reward is
    its output; with ``num_outputs=3`` (objective B with cross-entropy over labels −1, 0, +1) the reward is the
    expected label :func:`finegrain.losses.token_cls.expected_label_rewards`. The sequence score is
    ``S(y) = Σ_t m_t r_t``.
    """

    level = "token"

    def __init__(self, backbone: nn.Module, tokenizer: Any, head: nn.Module):
        super().__init__(backbone, tokenizer, head)
        self.num_outputs = 1 if isinstance(head, ScalarHead) else head.out_features

    def head_config(self) -> dict[str, Any]:
        proj = self.head.proj if isinstance(self.head, ScalarHead) else self.head
        return {"hidden_size": proj.in_features, "num_outputs": self.num_outputs}

    def forward(self, batch: CompletionBatch) -> torch.Tensor:
        """Head outputs on the response: ``(N, T)`` rewards, or ``(N, T, 3)`` logits with ``num_outputs=3``."""
        return self.head(reading_states(self.hidden(batch), batch))

    def token_values(self, batch: CompletionBatch, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """Token rewards ``(N, T)``, 0 outside the response mask."""
        from finegrain.losses.token_cls import expected_label_rewards

        out = self.forward(batch) if outputs is None else outputs
        values = expected_label_rewards(out) if self.num_outputs == 3 else out
        return torch.where(batch.completion_mask.bool(), values, torch.zeros_like(values))

    def score(self, batch: CompletionBatch) -> torch.Tensor:
        return self.token_values(batch).sum(dim=1)


class TokenDiscriminator(RewardModel):
    """TLCR token discriminator: two logits per position, reward ``r_t = 2·P(+ | x, y_≤t) − 1``.

    Yoon et al., Findings of ACL 2024, arXiv 2407.16574; the loss and reward are written out in docs/methods/tlcr.md.

    Args:
        double_softmax: reproduce the official RL script's second softmax (off by default).
        lag: credit the score of token ``t − lag`` to token ``t`` as the official code does with 1 (0 by default).
    """

    level = "discriminator"

    def __init__(self, backbone: nn.Module, tokenizer: Any, head: nn.Module, *, double_softmax: bool = False,
                 lag: int = 0):
        super().__init__(backbone, tokenizer, head)
        if lag < 0:
            raise ConfigError(f"TokenDiscriminator: lag must be >= 0, got {lag}")
        self.double_softmax, self.lag = double_softmax, lag

    def head_config(self) -> dict[str, Any]:
        return {"hidden_size": self.head.proj.in_features}

    def settings(self) -> dict[str, Any]:
        return {"double_softmax": self.double_softmax, "lag": self.lag}

    def forward(self, batch: CompletionBatch) -> torch.Tensor:
        """Logits ``(N, T, 2)`` (class 1 = positive)."""
        return self.head(reading_states(self.hidden(batch), batch))

    def token_values(self, batch: CompletionBatch, logits: torch.Tensor | None = None, **reward: Any) -> torch.Tensor:
        """``2·P(+) − 1`` per token ``(N, T)`` (with the compatibility flags), 0 outside the response mask.

        ``reward``: more options of :func:`finegrain.losses.token_cls.tlcr_token_rewards` (``mode``, ``end_mask``,
        ``neutral_band``, ``positive_value``, ``negative_value``, ``generator``), as the reward source passes them.
        """
        from finegrain.losses.token_cls import tlcr_token_rewards

        logits = self.forward(batch) if logits is None else logits
        return tlcr_token_rewards(logits, batch.completion_mask, double_softmax_compat=self.double_softmax,
                                  lag=self.lag, **reward)

    def score(self, batch: CompletionBatch) -> torch.Tensor:
        return self.token_values(batch).sum(dim=1)


# --------------------------------------------------------------------------------------------- sentence level


_PUNCT_END = re.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s|$)|[。！？]+[」』”’）]*|\n")


@dataclass
class PunctuationSplitter:
    """Cut after every run of sentence terminators followed by whitespace (or the end), and at newlines.

    Unlike :class:`~finegrain.data.segmentation.RuleSplitter` it has no abbreviation or case rules, so lowercase
    text such as the built-in world's ("it is hot . it shines .") is cut at every period (the rule splitter reads a
    period before a lowercase word as a sentence going on). Spans follow the
    :class:`~finegrain.data.segmentation.SentenceSplitter` guarantees; a piece with fewer than ``min_chars``
    non-space characters joins the previous sentence (the next one when it is first).

    Example:
        >>> t = "it is hot . it shines ."
        >>> [t[a:b] for a, b in PunctuationSplitter().split(t)]
        ['it is hot .', 'it shines .']
    """

    min_chars: int = 2

    def split(self, text: str) -> list[tuple[int, int]]:
        spans: list[list[int]] = []
        start, pending = 0, None
        for cut in [m.end() for m in _PUNCT_END.finditer(text)] + [len(text)]:
            a, b = start, cut
            start = cut
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if a == b:
                continue
            if pending is not None:
                a, pending = pending, None
            if sum(not c.isspace() for c in text[a:b]) >= self.min_chars:
                spans.append([a, b])
            elif spans:
                spans[-1][1] = b
            else:
                pending = a  # a tiny first piece joins the next sentence
        if pending is not None:
            spans.append([pending, len(text.rstrip())])
        return [(a, b) for a, b in spans]


def make_splitter(config: dict[str, Any] | None = None) -> SentenceSplitter:
    """A sentence splitter from its recorded config: ``{"name": "rule", "min_chars": 2}`` (default),
    ``{"name": "punct", "min_chars": 2}`` (:class:`PunctuationSplitter`) or
    ``{"name": "sat", "model": "sat-3l", "threshold": 0.2}`` (needs ``wtpsplit`` and the model on disk).

    Raises:
        ConfigError: an unknown splitter name or bad settings.
    """
    config = dict(config or {"name": "rule"})
    name = config.pop("name", "rule")
    try:
        if name == "rule":
            return RuleSplitter(**config)
        if name == "punct":
            return PunctuationSplitter(**config)
        if name == "sat":
            model = config.pop("model", "sat-3l")
            splitter = SaTSplitter.from_pretrained(model, **config)
            splitter.model_name = model  # recorded by splitter_config
            return splitter
    except TypeError as err:
        raise ConfigError(f"splitter {name!r}: bad settings {config}: {err}") from None
    raise ConfigError(f"unknown sentence splitter {name!r}; choose 'rule', 'punct' or 'sat'")


def splitter_config(splitter: SentenceSplitter) -> dict[str, Any]:
    """The config :func:`make_splitter` rebuilds ``splitter`` from (rule and SaT splitters)."""
    if isinstance(splitter, RuleSplitter):
        return {"name": "rule", "min_chars": splitter.min_chars}
    if isinstance(splitter, PunctuationSplitter):
        return {"name": "punct", "min_chars": splitter.min_chars}
    if isinstance(splitter, SaTSplitter):
        model = getattr(splitter, "model_name", "sat-3l")
        return {"name": "sat", "model": model, "threshold": splitter.threshold,
                "min_text_chars": splitter.min_text_chars, "min_chars": splitter.min_chars}
    raise ConfigError(f"cannot record a {type(splitter).__name__} splitter; use RuleSplitter, PunctuationSplitter "
                      "or SaTSplitter")


@dataclass
class SentenceExample:
    """One row prepared for the sentence RM (see :meth:`SentenceRewardModel.prepare`).

    Fields:
        prompt_input_ids: prompt ids (ending with ``<END>`` in insert mode); ``e_0`` is the last of them.
        completion_input_ids: response ids (with ``<END>`` tokens inserted in insert mode).
        boundaries: ``N`` response indices of the boundaries ``e_1 .. e_N``.
        spans: the splitter's sentence spans ``(start, end)`` in the response text.
        groups: ``N`` ints; boundary ``j`` closes the spans ``groups[j-1]+1 .. groups[j]`` (a sentence without a
            token of its own, or beyond ``max_sentences``, is folded into a neighbour's group).
    """

    prompt_input_ids: list[int]
    completion_input_ids: list[int]
    boundaries: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)


class SentenceRewardModel(RewardModel):
    """Sentence-level reward model (SRM, Qiu et al. 2025): ``R = Σ_{j=0}^{N} a_j s_j``.

    The formulas are written out in docs/methods/reward-models.md.

    ``forward`` takes a batch from :func:`collate_sentence_examples` (rows made by :meth:`prepare`), whose
    ``extras["srm_boundaries"] (N, K)`` holds the response indices of ``e_1 .. e_N`` (-1 padding); ``e_0`` is the
    last prompt column ``P − 1``. A row without a response boundary is scored at its last token.

    Args:
        backbone, tokenizer: the causal LM and its tokenizer (with ``<END>`` added in insert mode, see
            :func:`build_reward_model`).
        head: a :class:`SentenceRewardHead`.
        boundary_mode: ``"insert"`` or ``"mark"``.
        splitter: the sentence splitter (default :class:`RuleSplitter`).
        end_token: the boundary token of insert mode.
    """

    level = "sentence"

    def __init__(self, backbone: nn.Module, tokenizer: Any, head: SentenceRewardHead, *,
                 boundary_mode: str = "insert", splitter: SentenceSplitter | None = None,
                 end_token: str = END_TOKEN):
        super().__init__(backbone, tokenizer, head)
        if boundary_mode not in BOUNDARY_MODES:
            raise ConfigError(f"boundary_mode must be one of {BOUNDARY_MODES}, got {boundary_mode!r}")
        self.boundary_mode = boundary_mode
        self.splitter = splitter or RuleSplitter()
        self.end_token = end_token
        self.end_token_id: int | None = None
        if boundary_mode == "insert":
            end_id = tokenizer.convert_tokens_to_ids(end_token)
            if end_id is None or end_id == tokenizer.unk_token_id:
                raise ConfigError(f"insert mode needs the {end_token!r} token in the tokenizer; build the model with "
                                  "build_reward_model(..., level='sentence') which adds it")
            self.end_token_id = int(end_id)

    def head_config(self) -> dict[str, Any]:
        h = self.head
        return {"hidden_size": h.value.in_features, "embed_dim": h.embed_dim, "rope_theta": h.rope_theta,
                "max_sentences": h.max_sentences, "weighted_sum": h.weighted_sum}

    def settings(self) -> dict[str, Any]:
        return {"boundary_mode": self.boundary_mode, "splitter": splitter_config(self.splitter),
                "end_token": self.end_token}

    @property
    def max_response_sentences(self) -> int:
        """The most response boundaries a row may have (``max_sentences`` counts ``e_0`` too)."""
        return self.head.max_sentences - 1 if self.head.weighted_sum else 1 << 30

    def prepare(self, prompt_ids: Sequence[int], response_ids: Sequence[int], text: str,
                offsets: Sequence[tuple[int, int]]) -> SentenceExample:
        """Split ``text`` into sentences and build the row's ids and boundaries (docs/methods/reward-models.md).

        Sentences are mapped to the response tokens by character offsets (a sentence without a token of its own
        joins the next boundary's group); when there are more than ``max_sentences − 1`` of them the trailing ones
        are merged into the last allowed boundary, so rollouts of any length can be scored (the SRM code raises
        instead).

        Args:
            prompt_ids: the prompt's token ids (at least one).
            response_ids: the response's token ids (EOS last when present).
            text: the response text the offsets refer to.
            offsets: ``(start, end)`` of every response token in ``text`` (EOS: an empty span).

        Returns:
            A :class:`SentenceExample`.
        """
        spans = self.splitter.split(text)
        ends = sentence_token_ends(spans, offsets) if spans else []
        kept = [(j, e) for j, e in enumerate(ends) if e >= 0]
        limit = self.max_response_sentences
        if len(kept) > limit:
            kept = kept[: limit - 1] + [kept[-1]] if limit > 1 else [kept[-1]]
        if kept:  # the last group also takes any later span that has no token
            kept[-1] = (len(spans) - 1, kept[-1][1])
        token_ends = [e for _, e in kept]
        if self.boundary_mode == "insert":
            b = insert_end_tokens(prompt_ids, response_ids, token_ends, self.end_token_id,
                                  eos_token_id=self.tokenizer.eos_token_id)
        else:
            b = mark_sentence_ends(prompt_ids, response_ids, token_ends)
        return SentenceExample(b.prompt_ids, b.response_ids, b.response_boundaries, [tuple(s) for s in spans],
                               [j for j, _ in kept])

    def forward(self, batch: CompletionBatch) -> SentenceRewardOutput:
        h = self.hidden(batch)
        P = batch.prompt_input_ids.shape[1]
        if P < 1:
            raise DataError("the sentence RM needs at least one prompt token for the boundary e_0")
        resp = batch.extras.get("srm_boundaries")
        if resp is None:
            raise DataError("sentence RM batches need extras['srm_boundaries'] (use collate_sentence_examples)")
        N = h.shape[0]
        e0 = torch.full((N, 1), P - 1, dtype=torch.long, device=h.device)
        positions = torch.cat([e0, torch.where(resp >= 0, resp + P, resp)], dim=1)
        fallback = P + last_token_index(batch.completion_mask)
        return self.head(h, boundary_positions=positions, fallback_positions=fallback)

    def score(self, batch: CompletionBatch) -> torch.Tensor:
        return self.forward(batch).score


def collate_sentence_examples(examples: Sequence[SentenceExample | dict], pad_token_id: int) -> CompletionBatch:
    """Pad prepared rows into a :class:`CompletionBatch` with ``extras["srm_boundaries"] (N, K)`` (-1 padded).

    Args:
        examples: :class:`SentenceExample` objects or dicts with the same fields.
        pad_token_id: the id written in padded positions.

    Returns:
        The batch (layout of :mod:`finegrain.types`), ``K = max(1, max_i N_i)``.
    """
    from finegrain.data.collate import collate_completions

    rows = [ex if isinstance(ex, dict) else ex.__dict__ for ex in examples]
    batch = collate_completions(
        [{"prompt_input_ids": r["prompt_input_ids"], "completion_input_ids": r["completion_input_ids"]} for r in rows],
        pad_token_id,
    )
    K = max([1] + [len(r["boundaries"]) for r in rows])
    bounds = torch.full((len(rows), K), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r["boundaries"]:
            bounds[i, : len(r["boundaries"])] = torch.as_tensor(r["boundaries"], dtype=torch.long)
    batch.extras["srm_boundaries"] = bounds
    return batch


# ----------------------------------------------------------------------------------------------- build / save


_CLASSES: dict[str, type[RewardModel]] = {
    "sequence": SequenceRewardModel,
    "sentence": SentenceRewardModel,
    "token": TokenRewardModel,
    "discriminator": TokenDiscriminator,
}


def _hidden_size(backbone: nn.Module) -> int:
    config = getattr(backbone, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return int(backbone.get_input_embeddings().weight.shape[1])


def _make_head(level: str, config: dict[str, Any]) -> nn.Module:
    H = int(config["hidden_size"])
    if level in ("sequence",):  # a head config without "bias" is from before the bias-free default: it had one
        return ScalarHead(H, bias=bool(config.get("bias", True)))
    if level == "token":
        k = int(config.get("num_outputs", 1))
        if k not in (1, 3):
            raise ConfigError(f"token RM heads have 1 or 3 outputs, got {k}")
        return ScalarHead(H) if k == 1 else nn.Linear(H, 3)
    if level == "discriminator":
        return TwoClassHead(H)
    if level == "sentence":
        return SentenceRewardHead(H, int(config.get("embed_dim", 128)), rope_theta=float(config.get("rope_theta", 1e4)),
                                  max_sentences=int(config.get("max_sentences", 100)),
                                  weighted_sum=bool(config.get("weighted_sum", True)))
    raise ConfigError(f"unknown reward-model level {level!r}; choose one of {', '.join(LEVELS)}")


def input_embedding_name(backbone: nn.Module) -> str:
    """The attribute name of the backbone's input embedding module (e.g. ``embed_tokens``, ``wte``)."""
    emb = backbone.get_input_embeddings()
    for name, module in backbone.named_modules():
        if module is emb:
            return name.rsplit(".", 1)[-1]
    raise ConfigError(f"cannot find the input embedding module of {type(backbone).__name__}")


def build_reward_model(
    level: str,
    backbone: nn.Module,
    tokenizer: Any,
    *,
    num_outputs: int = 1,
    embed_dim: int = 128,
    max_sentences: int = 100,
    weighted_sum: bool = True,
    rope_theta: float = 10000.0,
    boundary_mode: str = "insert",
    splitter: SentenceSplitter | None = None,
    end_token: str = END_TOKEN,
    double_softmax: bool = False,
    lag: int = 0,
    score_bias: bool = False,
    seed: int | None = None,
) -> RewardModel:
    """A fresh reward model of ``level`` on ``backbone`` (a new, randomly initialised head).

    For the sentence level in insert mode the ``<END>`` token is added to ``tokenizer`` (in place) and the
    embedding matrix resized to a multiple of 8 (as SRM's code does); do this **before** wrapping the backbone
    with LoRA and list the embedding in ``modules_to_save`` (:func:`input_embedding_name`) so ``<END>`` can be
    learned.

    Args:
        level: ``sequence``, ``sentence``, ``token`` or ``discriminator``.
        backbone: an ``AutoModelForCausalLM`` (optionally already PEFT-wrapped, not for insert mode).
        tokenizer: its fast tokenizer.
        num_outputs: token RM head outputs (1: scalar reward; 3: classes −1/0/+1).
        embed_dim, max_sentences, weighted_sum, rope_theta: :class:`SentenceRewardHead` settings.
        boundary_mode: ``"insert"`` or ``"mark"`` (sentence level).
        splitter: sentence splitter (default rule based).
        end_token: the boundary token text of insert mode.
        double_softmax, lag: :class:`TokenDiscriminator` compatibility flags.
        score_bias: give the sequence RM's score head a bias (the head before the bias-free default).
        seed: seed of the head's initialisation (None: the global RNG).

    Returns:
        The model; its head is float32.
    """
    if level not in _CLASSES:
        raise ConfigError(f"unknown reward-model level {level!r}; choose one of {', '.join(LEVELS)}")
    if level == "sentence" and boundary_mode == "insert":
        if tokenizer.convert_tokens_to_ids(end_token) in (None, tokenizer.unk_token_id):
            tokenizer.add_tokens([end_token], special_tokens=True)
        vocab = backbone.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            backbone.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    config = {"hidden_size": _hidden_size(backbone), "num_outputs": num_outputs, "embed_dim": embed_dim,
              "max_sentences": max_sentences, "weighted_sum": weighted_sum, "rope_theta": rope_theta,
              "bias": score_bias}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        head = _make_head(level, config).float()
    return _instantiate(level, backbone, tokenizer, head, boundary_mode=boundary_mode, splitter=splitter,
                        end_token=end_token, double_softmax=double_softmax, lag=lag)


def _instantiate(level: str, backbone, tokenizer, head, **settings) -> RewardModel:
    if level == "sentence":
        return SentenceRewardModel(backbone, tokenizer, head, boundary_mode=settings["boundary_mode"],
                                   splitter=settings.get("splitter"), end_token=settings["end_token"])
    if level == "discriminator":
        return TokenDiscriminator(backbone, tokenizer, head, double_softmax=settings["double_softmax"],
                                  lag=settings["lag"])
    return _CLASSES[level](backbone, tokenizer, head)


def save_reward_model(model: RewardModel, path: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None,
                      extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` so that :func:`load_reward_model` restores it (layout in the module docstring).

    The directory is written beside its final place and renamed into it, so a reader never sees half of it. A
    LoRA backbone is saved merged (a plain causal LM).

    Args:
        model: the reward model (unwrapped).
        path: the directory (replaced if it exists).
        state_dict: the module's full state dict when it is gathered elsewhere (distributed runs); None: its own.
        extra: more entries for ``finegrain_reward.json`` (e.g. the training run's settings).

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    from finegrain import __version__

    path = Path(path)
    if state_dict is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(state_dict)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        merged = is_peft_model(model.backbone)  # saved as a plain causal LM; the trained model is left as it is
        if merged:
            save_merged_lora(model.backbone, tmp)
        else:
            model.backbone.save_pretrained(tmp, safe_serialization=True)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}, str(tmp / HEAD_FILE))
        info = {"format": FORMAT, "level": model.level, "head": model.head_config(), **model.settings(),
                "peft_merged": merged, "finegrain_version": __version__, **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_reward_model_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a model saved by :func:`save_reward_model`."""
    return (Path(path) / CONFIG_FILE).is_file()


def load_reward_model(path: str | Path, *, device: str | torch.device | None = None, dtype: str | None = None,
                      trust_remote_code: bool = False, **overrides: Any) -> RewardModel:
    """Load a reward model saved by :func:`save_reward_model`, in eval mode.

    Args:
        path: the directory.
        device: where to put it (default: CPU).
        dtype: backbone dtype (``float32``, ``bfloat16``, ``float16``, ``auto``; default float32); the head stays
            float32.
        trust_remote_code: allow custom model code (off unless asked).
        **overrides: settings to change at load time: ``double_softmax``, ``lag`` (discriminator), ``splitter``
            (a splitter object, sentence level).

    Returns:
        The model (``.tokenizer`` holds its tokenizer).

    Raises:
        ConfigError: not a reward-model directory, an unknown level or format, or weights that do not match.
    """
    from safetensors.torch import load_file

    from finegrain.models.loading import load_causal_lm, load_tokenizer

    path = Path(path)
    if not is_reward_model_dir(path):
        raise ConfigError(f"{path} is not a finegrain reward model (no {CONFIG_FILE}); train one with `finegrain rm` "
                          "and pass its final/ directory")
    info = json.loads((path / CONFIG_FILE).read_text())
    if info.get("format") != FORMAT:
        raise ConfigError(f"{path}: reward-model format {info.get('format')!r} is not supported (expected {FORMAT})")
    level = info.get("level")
    if level not in _CLASSES:
        raise ConfigError(f"{path}: unknown reward-model level {level!r}")
    tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    backbone = load_causal_lm(str(path), trust_remote_code=trust_remote_code, dtype=dtype, allow_reward_model=True)
    head = _make_head(level, info["head"]).float()
    try:
        head.load_state_dict(load_file(str(path / HEAD_FILE)))
    except (RuntimeError, FileNotFoundError) as err:
        raise ConfigError(f"{path}: the head weights do not match its {CONFIG_FILE}: {err}") from None
    unknown = set(overrides) - {"double_softmax", "lag", "splitter"}
    if unknown:
        raise ConfigError(f"load_reward_model: unknown overrides {sorted(unknown)}")
    settings = {
        "boundary_mode": info.get("boundary_mode", "insert"),
        "splitter": overrides.get("splitter") or make_splitter(info.get("splitter")),
        "end_token": info.get("end_token", END_TOKEN),
        "double_softmax": bool(overrides.get("double_softmax", info.get("double_softmax", False))),
        "lag": int(overrides.get("lag", info.get("lag", 0))),
    }
    model = _instantiate(level, backbone, tokenizer, head, **settings)
    model.eval()
    return model.to(device) if device is not None else model
