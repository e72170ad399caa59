"""The reward-model classes: a causal-LM backbone and a head, at four granularities (table, saved format and
builders: :mod:`finegrain.models.reward_model`, which re-exports the classes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finegrain.data.segmentation import (
    RuleSplitter,
    SentenceSplitter,
    insert_end_tokens,
    mark_sentence_ends,
    sentence_token_ends,
)
from finegrain.errors import ConfigError, DataError
from finegrain.models.forward import hidden_states, reading_states
from finegrain.models.heads import SentenceRewardHead, SentenceRewardOutput
from finegrain.ops.masked import last_token_index, zero_masked
from finegrain.types import CompletionBatch

BOUNDARY_MODES: tuple[str, ...] = ("insert", "mark")
FLAT_FILE = "reward_model.safetensors"
END_TOKEN = "<END>"


class RewardModel(nn.Module):
    """Common part of the four reward models: a causal-LM backbone, a head, the tokenizer and the settings.

    Args:
        backbone: a Hugging Face ``AutoModelForCausalLM`` (or its PEFT wrapper).
        tokenizer: its fast tokenizer (saved with the model; not a module).
        head: the reward head.

    Subclasses define ``forward(batch)`` (what training differentiates; by default the head on the reading
    states), :meth:`score` (one number per row, for pairwise accuracy; by default the summed ``token_values``)
    and ``setting_names``.
    """

    level: ClassVar[str] = ""
    setting_names: ClassVar[tuple[str, ...]] = ()
    """The constructor's keyword settings, recorded in ``finegrain_reward.json`` (besides the head config)."""

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

    def forward(self, batch: CompletionBatch) -> torch.Tensor:
        """The head's outputs at the reading states ``(N, T, ...)`` (token levels; the others override it)."""
        return self.head(reading_states(self.hidden(batch), batch))

    def score(self, batch: CompletionBatch) -> torch.Tensor:
        """One score per row, ``(N,)``: what pairwise accuracy compares (token levels: ``token_values``
        summed)."""
        return self.token_values(batch).sum(dim=1)

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
    default (as TRL's; why: docs/methods/reward-models.md); a head with ``b`` (``bias=True`` in
    ``finegrain_reward.json``, or no ``bias`` entry: saved before the bias-free default) still loads.
    """

    level = "sequence"

    def forward(self, batch: CompletionBatch) -> torch.Tensor:
        """Scores ``(N,)``."""
        h = self.hidden(batch)
        P = batch.prompt_input_ids.shape[1]
        index = P + last_token_index(batch.completion_mask)  # -1 (empty response) -> the last prompt column
        rows = h.gather(1, index.view(-1, 1, 1).expand(-1, 1, h.shape[-1])).squeeze(1)
        return self.head(rows)

    score = forward


class TokenRewardModel(RewardModel):
    """Token-level reward model ``r_φ(x, y_≤t)`` on every response position (docs/methods/token-rm.md).

    With ``num_outputs=1`` (objective A, and B with MSE) the head is a
    :class:`~finegrain.models.heads.ScalarHead` and the token reward is its output; with ``num_outputs=3``
    (objective B with cross-entropy over labels −1, 0, +1; an ``nn.Linear(H, 3)`` head) the reward is the
    expected label :func:`finegrain.losses.token_cls.expected_label_rewards`. ``forward`` gives the head
    outputs on the response: ``(N, T)`` rewards, or ``(N, T, 3)`` logits with ``num_outputs=3``. The sequence
    score is ``S(y) = Σ_t m_t r_t``.
    """

    level = "token"

    def token_values(self, batch: CompletionBatch, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """Token rewards ``(N, T)``, 0 outside the response mask."""
        from finegrain.losses.token_cls import expected_label_rewards

        out = self.forward(batch) if outputs is None else outputs
        values = expected_label_rewards(out) if getattr(self.head, "out_features", 1) == 3 else out
        return zero_masked(values, batch.completion_mask)


class TokenDiscriminator(RewardModel):
    """TLCR token discriminator: two logits per position, reward ``r_t = 2·P(+ | x, y_≤t) − 1``.

    Yoon et al., Findings of ACL 2024, arXiv 2407.16574; the loss and reward are written out in docs/methods/tlcr.md.
    ``forward`` gives the logits ``(N, T, 2)`` (class 1 = positive).

    Args:
        double_softmax: reproduce the official RL script's second softmax (off by default).
        lag: credit the score of token ``t − lag`` to token ``t`` as the official code does with 1 (0 by default).
    """

    level = "discriminator"
    setting_names = ("double_softmax", "lag")

    def __init__(self, backbone: nn.Module, tokenizer: Any, head: nn.Module, *, double_softmax: bool = False,
                 lag: int = 0):
        super().__init__(backbone, tokenizer, head)
        if lag < 0:
            raise ConfigError(f"TokenDiscriminator: lag must be >= 0, got {lag}")
        self.double_softmax, self.lag = double_softmax, lag

    def token_values(self, batch: CompletionBatch, logits: torch.Tensor | None = None, **reward: Any) -> torch.Tensor:
        """``2·P(+) − 1`` per token ``(N, T)`` (with the compatibility flags), 0 outside the response mask.

        ``reward``: more options of :func:`finegrain.losses.token_cls.tlcr_token_rewards` (``mode``, ``end_mask``,
        ``neutral_band``, ``positive_value``, ``negative_value``, ``generator``), as the reward source passes them.
        """
        from finegrain.losses.token_cls import tlcr_token_rewards

        logits = self.forward(batch) if logits is None else logits
        return tlcr_token_rewards(logits, batch.completion_mask, double_softmax_compat=self.double_softmax,
                                  lag=self.lag, **reward)


# --------------------------------------------------------------------------------------------- sentence level


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
    setting_names = ("boundary_mode", "splitter", "end_token")

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
        limit = self.head.max_sentences - 1 if self.head.weighted_sum else 1 << 30  # max_sentences counts e_0
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
    keys = ("prompt_input_ids", "completion_input_ids")
    batch = collate_completions([{k: r[k] for k in keys} for r in rows], pad_token_id)
    K = max([1] + [len(r["boundaries"]) for r in rows])
    bounds = [[int(b) for b in r["boundaries"]] + [-1] * (K - len(r["boundaries"])) for r in rows]
    batch.extras["srm_boundaries"] = torch.tensor(bounds, dtype=torch.long).reshape(len(rows), K)
    return batch
