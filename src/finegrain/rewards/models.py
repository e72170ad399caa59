"""Reward sources backed by trained reward models: sequence RM, sentence RM, token RM, TLCR discriminator.

Each source wraps a :class:`finegrain.models.reward_model.RewardModel` and the *policy's* tokenizer and returns
:class:`finegrain.types.TokenRewards` in the policy's response layout (docs/reward-sources.md); each class
says what its ``values[b, t]`` hold: the score ``r(x, y)`` on the last token (:class:`SequenceRMSource`),
SRM's ``a_j s_j`` at sentence ends (:class:`SentenceRMSource`), ``r_φ(x, y_≤t)`` (:class:`TokenRMSource`) or
TLCR's ``2·P(+ | x, y_≤t) − 1`` (:class:`DiscriminatorSource`).

``seq_reward`` is left None: every reward is already in ``values`` (a consumer such as
:func:`finegrain.rl.rewards.dense_rewards` would add ``seq_reward`` a second time); the model's sequence scores are
in ``meta["scores"]``. ``SequenceRMSource(seq_reward=True)`` returns zero values and the score as ``seq_reward``
instead.

**Tokenizers.** When the reward model's tokenizer has the policy's vocabulary the policy's token ids are scored as
they are. Otherwise every row is decoded to text (special tokens dropped), re-tokenised with the reward model's
tokenizer, scored, and the rewards are mapped back onto the policy's tokens through character offsets
(:func:`map_token_values`); the policy's offsets come from decoding prefixes (:func:`decode_with_offsets`), never
from re-tokenising. Sentence sources always go through the text, since the splitter needs it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from finegrain.errors import ConfigError, DataError
from finegrain.ops.masked import zero_masked
from finegrain.rewards.base import check_finite
from finegrain.rewards.placement import place_at_span_ends, place_on_last_token, spread_over_spans
from finegrain.types import CompletionBatch, TokenRewards

__all__ = [
    "DiscriminatorSource",
    "RewardModelSource",
    "SentenceRMSource",
    "SequenceRMSource",
    "TokenRMSource",
    "decode_with_offsets",
    "make_reward_source",
    "map_token_values",
    "same_vocabulary",
    "sentence_token_groups",
]


# ------------------------------------------------------------------------------------------- pure mapping maths


def decode_with_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decode token ids to text and give each token its character span in that text.

    ``text = decode(ids)`` with special tokens dropped; token ``t`` covers ``[e_{t−1}, e_t)`` where ``e_t`` is the
    length of the longest common prefix of ``decode(ids[:t+1])`` and ``text``, made non-decreasing. Decoding
    prefixes (not single tokens) keeps spaces and multi-byte characters right: a token that ends inside a UTF-8
    character decodes to ``�``, which is not a prefix of the text, so that token gets an empty span and the next
    one covers the character. Special tokens (EOS, padding) get empty spans.

    Args:
        tokenizer: a Hugging Face tokenizer.
        ids: ``n`` token ids.

    Returns:
        ``(text, offsets)`` with ``n`` ``(start, end)`` pairs.

    Example:
        >>> from finegrain.world.tokenizer import build_tokenizer
        >>> tok = build_tokenizer()
        >>> decode_with_offsets(tok, tok("it is hot .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        ('it is hot .', [(0, 2), (2, 5), (5, 9), (9, 11), (11, 11)])
    """
    ids = [int(i) for i in ids]
    if not ids:
        return "", []
    text = tokenizer.decode(ids, skip_special_tokens=True)
    prefixes = tokenizer.batch_decode([ids[: t + 1] for t in range(len(ids))], skip_special_tokens=True)
    offsets, end = [], 0
    for p in prefixes:
        n = min(len(p), len(text))
        # the common prefix, scanned only when the slices differ (rare: partial characters, decoder clean-up)
        k = n if p[:n] == text[:n] else len(os.path.commonprefix([p, text]))
        start, end = end, max(end, k)
        offsets.append((start, end))
    return text, offsets


def map_token_values(
    values: Any,
    src_offsets: Any,
    dst_offsets: Any,
    *,
    reduce: str = "sum",
    end_index: int | None = None,
) -> np.ndarray:
    """Move per-token values from one tokenization of a text to another, through character offsets.

    Each source token goes to the destination token at which it has been fully read: the first destination token
    whose end is at or after the source token's end (``searchsorted`` on the destination ends). A source token with
    an empty span at or after the end of the text (EOS, other trailing special tokens) goes to the destination
    token ``end_index`` (the last valid one: EOS when the destination has it). ``reduce="sum"`` adds the values
    that land on the same token (additive rewards: the total is preserved), ``"mean"`` averages them (bounded
    scores such as ``2·P(+) − 1``); a destination token that receives nothing gets 0.

    Args:
        values: ``(n,)`` values on the source tokens.
        src_offsets: ``(n, 2)`` source token spans.
        dst_offsets: ``(m, 2)`` destination token spans in the same text, non-decreasing ends.
        reduce: ``"sum"`` or ``"mean"``.
        end_index: the destination index for trailing empty source tokens (default ``m − 1``).

    Returns:
        ``(m,)`` float64.

    Example:
        >>> map_token_values([1.0, 2.0, 4.0], [(0, 2), (2, 5), (5, 5)], [(0, 5), (5, 5)])
        array([3., 4.])
    """
    if reduce not in ("sum", "mean"):
        raise ConfigError(f"map_token_values: reduce must be 'sum' or 'mean', got {reduce!r}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    src = np.asarray(src_offsets, dtype=np.int64).reshape(-1, 2)
    dst = np.asarray(dst_offsets, dtype=np.int64).reshape(-1, 2)
    if len(v) != len(src):
        raise DataError(f"{len(v)} values for {len(src)} source tokens")
    m = len(dst)
    out = np.zeros(m, dtype=np.float64)
    if m == 0 or len(v) == 0:
        return out
    text_end = int(max(dst[:, 1].max(), src[:, 1].max()))
    last = m - 1 if end_index is None else int(end_index)
    target = np.searchsorted(dst[:, 1], src[:, 1], side="left")
    trailing = (src[:, 0] == src[:, 1]) & (src[:, 1] >= text_end)
    target = np.where(trailing, last, np.minimum(target, last))
    np.add.at(out, target, v)
    if reduce == "mean":
        counts = np.bincount(target, minlength=m).astype(np.float64)
        out = out / np.maximum(counts, 1.0)
    return out


def sentence_token_groups(
    spans: Sequence[tuple[int, int]], groups: Sequence[int], dst_offsets: Any
) -> tuple[list[int], list[int]]:
    """Where the sentence terms of one row go on the destination tokens: group ends, and every token's group.

    Boundary ``k`` closes the sentence spans ``groups[k−1]+1 .. groups[k]`` (see
    :class:`finegrain.models.reward_model.SentenceExample`). A destination token belongs to the group of the first
    sentence span it overlaps (:func:`finegrain.data.segmentation.token_sentence_ids`); tokens in no sentence (EOS,
    whitespace) belong to none.

    Args:
        spans: ``S`` sentence character spans of the text.
        groups: ``K`` last-span indices, increasing, the last one ``S − 1``.
        dst_offsets: ``(m, 2)`` destination token spans.

    Returns:
        ``(group_ends, token_groups)``: ``K`` indices of each group's last destination token (-1: no token), for
        :func:`~finegrain.rewards.placement.place_at_span_ends`; ``m`` group ids in ``[-1, K)``, for
        :func:`~finegrain.rewards.placement.spread_over_spans`.

    Example:
        >>> sentence_token_groups([(0, 5), (6, 9), (10, 12)], [0, 2], [(0, 2), (2, 5), (5, 9), (9, 12), (12, 12)])
        ([1, 3], [0, 0, 1, 1, -1])
    """
    from finegrain.data.segmentation import token_sentence_ids

    m = len(dst_offsets)
    if not len(groups) or not spans:
        return [-1] * len(groups), [-1] * m
    sid = np.asarray(token_sentence_ids(spans, dst_offsets), dtype=np.int64)
    g_of_span = np.minimum(np.searchsorted(np.asarray(groups, dtype=np.int64), np.arange(len(spans)), side="left"),
                           len(groups) - 1)
    token_groups = np.where(sid >= 0, g_of_span[np.maximum(sid, 0)], -1)
    ends = np.full(len(groups), -1, dtype=np.int64)
    has = token_groups >= 0
    ends[token_groups[has]] = np.flatnonzero(has)  # in token order: the last token of each group wins
    return ends.tolist(), token_groups.tolist()


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every token to the same id (then token ids can be shared as they are)."""
    if a is b:
        return True
    try:
        return len(a) == len(b) and a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
    except Exception:  # a tokenizer without get_vocab
        return False


# ---------------------------------------------------------------------------------------------------- sources


class _Row:
    """One row of a policy batch, in the policy's and in the reward model's tokenization."""

    __slots__ = ("prompt_ids", "response_ids", "text", "policy_offsets", "rm_prompt", "rm_response",
                 "rm_offsets")


class RewardModelSource:
    """Common part of the reward-model sources: row extraction, re-tokenisation, running the model in chunks.

    Args:
        model: a :class:`~finegrain.models.reward_model.RewardModel` (its ``.tokenizer`` is the RM's tokenizer).
        policy_tokenizer: the tokenizer of the batches to score.
        name: the source's name in logs and errors (default: the level's name, e.g. ``"token_rm"``).
        batch_size: rows per reward-model forward pass (None: the whole batch at once).
        max_length: most prompt + response tokens per row for the reward model (default: the backbone's
            ``max_position_embeddings``); a longer row keeps the end of its prompt, then the start of its
            response, and tokens cut off get reward 0.
    """

    default_name = "rm"

    def __init__(self, model, policy_tokenizer, *, name: str | None = None, batch_size: int | None = None,
                 max_length: int | None = None):
        self.model = model
        self.policy_tokenizer = policy_tokenizer
        self.name = name or self.default_name
        self.batch_size = batch_size
        config = getattr(getattr(model, "backbone", None), "config", None)
        self.max_length = max_length or getattr(config, "max_position_embeddings", None)
        self.same_tokenizer = same_vocabulary(model.tokenizer, policy_tokenizer)

    # -- to be specialised ----------------------------------------------------------------------------------

    needs_text = False

    def _score_same(self, batch: CompletionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values (N, T), scores (N,))`` on the policy's own ids."""
        raise NotImplementedError

    def _score_rows(self, rows: list[_Row], T: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """``(values (N, T), scores (N,), meta)`` for rows that go through the text."""
        raise NotImplementedError

    # -- the contract -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def token_rewards(self, batch: CompletionBatch) -> TokenRewards:
        """Rewards for the ``N`` rows of ``batch`` in its response layout (see the module docstring)."""
        mask = batch.completion_mask.to(torch.bool)
        was_training = self.model.training
        self.model.eval()
        try:
            if self.same_tokenizer and not self.needs_text:
                values, scores, meta = *self._score_same(batch), {}
                values, scores = values.float().cpu(), scores.float().cpu()
            else:
                rows = self._rows(batch)
                v, s, meta = self._score_rows(rows, mask.shape[1])
                values, scores = torch.from_numpy(v).float(), torch.from_numpy(s).float()
        finally:
            self.model.train(was_training)
        device = batch.completion_input_ids.device
        values = zero_masked(values, mask.cpu())
        out = self._finish(values.to(device), mask, scores.to(device), meta)
        return check_finite(out, self.name)

    def _finish(self, values: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, meta: dict,
                seq_reward: torch.Tensor | None = None) -> TokenRewards:
        return TokenRewards(values=values, mask=mask, seq_reward=seq_reward, meta={"scores": scores, **meta})

    # -- shared machinery -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _chunks(self, items: Sequence) -> list[tuple[slice, Sequence]]:
        """``(where, items[where])`` for every slice of ``batch_size`` items (None: all at once)."""
        size = self.batch_size or max(len(items), 1)
        return [(slice(lo, lo + size), items[lo : lo + size]) for lo in range(0, len(items), size)]

    def _same_chunks(self, batch: CompletionBatch, score) -> torch.Tensor:
        """``score`` of every chunk of ``batch`` on the model's device, joined on the CPU in float32."""
        chunks = self._chunks(range(batch.num_rows))
        parts = [score(_take(batch, c).to(self.device)).float().cpu() for c, _ in chunks]
        return torch.cat(parts) if parts else torch.zeros(batch.completion_mask.shape)

    def _rows(self, batch: CompletionBatch) -> list[_Row]:
        """Decode every row; re-tokenise it with the reward model's tokenizer unless the vocabularies agree."""
        from finegrain.data.tokenize import tokenize_prompt, tokenize_response

        ptok, rtok = self.policy_tokenizer, self.model.tokenizer
        eos = ptok.eos_token_id
        rows = []
        for i in range(batch.num_rows):
            r = _Row()
            r.prompt_ids = batch.prompt_input_ids[i][batch.prompt_attention_mask[i].bool()].tolist()
            r.response_ids = batch.completion_input_ids[i][batch.completion_mask[i].bool()].tolist()
            r.text, r.policy_offsets = decode_with_offsets(ptok, r.response_ids)
            if self.same_tokenizer:
                r.rm_prompt, r.rm_response, r.rm_offsets = r.prompt_ids, r.response_ids, r.policy_offsets
            else:
                ends_with_eos = bool(r.response_ids) and r.response_ids[-1] == eos
                prompt_text = ptok.decode(r.prompt_ids, skip_special_tokens=True)
                try:
                    r.rm_prompt = tokenize_prompt(rtok, prompt_text)
                except Exception as err:
                    raise DataError(f"cannot tokenize the prompt for the reward model: {err}", row=i) from None
                if not r.rm_prompt:
                    raise DataError("the prompt has no token in the reward model's tokenizer (and it has no BOS)",
                                    row=i, field="prompt")
                ids, offs, _ = tokenize_response(rtok, r.text, add_eos=ends_with_eos)
                r.rm_response, r.rm_offsets = ids, [tuple(o) for o in offs]
            self._fit(r)
            rows.append(r)
        return rows

    def _fit(self, r: _Row) -> None:
        """Cut a row to ``max_length`` reward-model tokens: the prompt's end, then the response's start."""
        limit = self.max_length
        if not limit or len(r.rm_prompt) + len(r.rm_response) <= limit:
            return
        keep_prompt = max(1, min(len(r.rm_prompt), limit - len(r.rm_response)))
        r.rm_prompt = r.rm_prompt[len(r.rm_prompt) - keep_prompt :]
        keep = max(0, limit - len(r.rm_prompt))
        r.rm_response, r.rm_offsets = r.rm_response[:keep], r.rm_offsets[:keep]

    def _rm_batch(self, rows: list[_Row]) -> CompletionBatch:
        from finegrain.data.collate import collate_completions, pad_token_id

        examples = [{"prompt_input_ids": r.rm_prompt, "completion_input_ids": r.rm_response} for r in rows]
        return collate_completions(examples, pad_token_id(self.model.tokenizer)).to(self.device)


class SequenceRMSource(RewardModelSource):
    """A sequence reward model's score ``r(x, y)`` on the last valid response token, 0 elsewhere
    (:func:`~finegrain.rewards.placement.place_on_last_token`; the RLHF baseline; ``dense`` is False: its
    reward is one score per response).

    Args:
        seq_reward: return zero ``values`` and the score as ``seq_reward`` (for consumers that place it themselves).
        **kwargs: see :class:`RewardModelSource`.
    """

    default_name = "sequence_rm"
    dense = False

    def __init__(self, model, policy_tokenizer, *, seq_reward: bool = False, **kwargs):
        super().__init__(model, policy_tokenizer, **kwargs)
        self.as_seq_reward = seq_reward

    def _score_same(self, batch):
        return torch.zeros(batch.completion_mask.shape), self._same_chunks(batch, self.model.score)

    def _score_rows(self, rows, T):
        scores = np.zeros(len(rows))
        for chunk, part in self._chunks(rows):
            scores[chunk] = self.model.score(self._rm_batch(part)).float().cpu().numpy()
        return np.zeros((len(rows), T)), scores, {}

    def _finish(self, values, mask, scores, meta):
        if self.as_seq_reward:
            return super()._finish(torch.zeros_like(values), mask, scores, meta, seq_reward=scores)
        return super()._finish(place_on_last_token(scores.to(values.dtype), mask), mask, scores, meta)


class TokenRMSource(RewardModelSource):
    """Token-level reward model values ``r_φ(x, y_≤t)`` (Xu et al., ACL 2024; docs/methods/token-rm.md).

    Args:
        reduce: how values of several reward-model tokens landing on one policy token combine (``"sum"``: the
            additive choice, the sequence score is preserved; ``"mean"``).
        **kwargs: see :class:`RewardModelSource`.
    """

    default_name = "token_rm"

    def __init__(self, model, policy_tokenizer, *, reduce: str = "sum", **kwargs):
        super().__init__(model, policy_tokenizer, **kwargs)
        self.reduce = reduce

    def _values(self, batch: CompletionBatch) -> torch.Tensor:
        """Token rewards ``(n, T)`` of the reward model on a batch in its own tokenization."""
        return self.model.token_values(batch)

    def _score_same(self, batch):
        values = self._same_chunks(batch, self._values)
        return values, values.sum(dim=1)

    def _score_rows(self, rows, T):
        """Through the text: score in RM tokens, map onto the policy's tokens."""
        values = np.zeros((len(rows), T))
        scores = np.zeros(len(rows))
        for chunk, part in self._chunks(rows):
            rm_values = self._values(self._rm_batch(part)).float().cpu().numpy()
            for i, r in enumerate(part, chunk.start):
                n = len(r.rm_response)
                v = rm_values[i - chunk.start, :n]
                mapped = map_token_values(v, r.rm_offsets[:n], r.policy_offsets, reduce=self.reduce)
                values[i, : len(mapped)] = mapped
                scores[i] = v.sum()
        return values, scores, {}


class DiscriminatorSource(TokenRMSource):
    """TLCR discriminator rewards (Yoon et al., Findings ACL 2024; docs/methods/tlcr.md).

    ``values`` are :func:`finegrain.losses.token_cls.tlcr_token_rewards` of the discriminator's logits: the paper's
    continuous ``2·P(+) − 1`` by default, or one of the discrete baselines the paper compares it with, as the
    official code defines them (``mode``: ``sign`` ±1/0, ``fixed``, ``thresholded``, ``random``, ``positive``,
    ``negative``). The end-of-response token (EOS, a position the discriminator is never trained on) gets 0, as
    in the official code (``eos="zero"``); ``eos="model"`` keeps the discriminator's output there. The model's
    compatibility flags (double softmax, lag) apply as recorded.

    Args:
        reduce: how rewards of several reward-model tokens on one policy token combine; ``"mean"`` (default) keeps
            a mapped reward in ``[−1, 1]``.
        mode: one of :data:`finegrain.losses.token_cls.TLCR_REWARD_MODES` (default ``"continuous"``).
        eos: ``"zero"`` (default) or ``"model"``.
        neutral_band: the ``sign`` / ``thresholded`` band on ``|2·P(+) − 1|`` (default ``ln 1.5``, the official
            code's ``0.4 < max softmax(p) < 0.6``).
        positive_value, negative_value: the ``sign`` / ``fixed`` values (default ±1, the official defaults).
        seed: seed of the ``random`` mode's own stream (one ``torch.Generator`` per source, advanced by every call).
        **kwargs: see :class:`RewardModelSource`.
    """

    default_name = "discriminator"

    def __init__(self, model, policy_tokenizer, *, reduce: str = "mean", mode: str = "continuous",
                 eos: str = "zero", neutral_band: float | None = None, positive_value: float = 1.0,
                 negative_value: float = -1.0, seed: int = 0, **kwargs):
        from finegrain.losses.token_cls import OFFICIAL_NEUTRAL_BAND, TLCR_REWARD_MODES

        super().__init__(model, policy_tokenizer, reduce=reduce, **kwargs)
        if mode not in TLCR_REWARD_MODES:
            raise ConfigError(f"discriminator reward mode must be one of {', '.join(TLCR_REWARD_MODES)}, got {mode!r}")
        if eos not in ("zero", "model"):
            raise ConfigError(f"discriminator eos must be 'zero' (the official code) or 'model', got {eos!r}")
        band = OFFICIAL_NEUTRAL_BAND if neutral_band is None else float(neutral_band)
        if not 0.0 <= band <= 1.0:
            raise ConfigError(f"discriminator neutral_band must be in [0, 1] (a bound on |2·P(+) − 1|), got {band}")
        self.mode, self.eos, self.neutral_band = mode, eos, band
        self.positive_value, self.negative_value = float(positive_value), float(negative_value)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def _values(self, batch: CompletionBatch) -> torch.Tensor:
        eos_id = self.model.tokenizer.eos_token_id
        end = None
        if self.eos == "zero" and eos_id is not None:
            end = (batch.completion_input_ids == eos_id) & batch.completion_mask.to(torch.bool)
        return self.model.token_values(batch, mode=self.mode, end_mask=end, neutral_band=self.neutral_band,
                                       positive_value=self.positive_value, negative_value=self.negative_value,
                                       generator=self.generator)


class SentenceRMSource(RewardModelSource):
    """Sentence-level reward model terms (SRM, Qiu et al. 2025, arXiv 2503.04793; docs/methods/reward-models.md).

    Every response is split into sentences by the model's splitter; the term ``a_j s_j`` of sentence ``j >= 1``
    goes on the policy token that ends the sentence (or is spread uniformly over its tokens, ``spread=True``, our
    option, not in SRM); the prompt term ``a_0 s_0`` is dropped, so ``values`` sum to ``R − a_0 s_0``.

    Args:
        spread: spread each term over its sentence's tokens instead of placing it on the last one.
        prompt_term: add ``a_0 s_0`` to the first sentence's term, so that ``values`` sum to the score ``R`` (for
            judging responses by the sum of their rewards); off by default, as in the SRM code.
        **kwargs: see :class:`RewardModelSource`.

    ``meta``: ``scores`` (``R``), ``prompt_terms`` (``a_0 s_0``), ``num_sentences`` (response boundaries per row).
    """

    default_name = "sentence_rm"
    needs_text = True

    def __init__(self, model, policy_tokenizer, *, spread: bool = False, prompt_term: bool = False, **kwargs):
        super().__init__(model, policy_tokenizer, **kwargs)
        self.spread, self.prompt_term = spread, prompt_term

    def _score_rows(self, rows, T):
        from finegrain.data.collate import pad_token_id
        from finegrain.models.reward_model import collate_sentence_examples

        N = len(rows)
        values = torch.zeros(N, T, dtype=torch.float64)
        scores, prompt_terms, counts = np.zeros(N), np.zeros(N), np.zeros(N, dtype=np.int64)
        pad = pad_token_id(self.model.tokenizer)
        for chunk, part in self._chunks(rows):
            examples = [self.model.prepare(r.rm_prompt, r.rm_response, r.text, r.rm_offsets) for r in part]
            out = self.model(collate_sentence_examples(examples, pad).to(self.device))
            terms = out.terms.double().cpu()  # (n, 1 + K): e_0, then e_1 .. e_N; 0 on padding slots
            n = torch.tensor([len(ex.boundaries) for ex in examples])
            span_values = terms[:, 1:].clone()
            if self.prompt_term:
                span_values[:, 0] += torch.where(n > 0, terms[:, 0], 0.0)
            # each term goes on its group's last policy token (group ends) or over its tokens (token groups);
            # a group with no policy token (e.g. cut off) has nowhere to go and its term is dropped
            where = torch.full((len(part), T if self.spread else span_values.shape[1]), -1, dtype=torch.long)
            for k, (r, ex) in enumerate(zip(part, examples)):
                at = sentence_token_groups(ex.spans, ex.groups, r.policy_offsets)[1 if self.spread else 0]
                where[k, : len(at)] = torch.as_tensor(at, dtype=torch.long)
            part_mask = torch.arange(T) < torch.tensor([len(r.response_ids) for r in part]).unsqueeze(1)
            place = spread_over_spans if self.spread else place_at_span_ends
            values[chunk] = place(span_values, where, part_mask)
            scores[chunk] = out.score.double().cpu().numpy()
            prompt_terms[chunk] = terms[:, 0].numpy()
            counts[chunk] = n.numpy()
        meta = {"prompt_terms": torch.from_numpy(prompt_terms).float(), "num_sentences": torch.from_numpy(counts)}
        return values.numpy(), scores, meta


def _take(batch: CompletionBatch, sl: slice) -> CompletionBatch:
    """Rows ``sl`` of a batch (every tensor field and per-row/per-token extra)."""
    return CompletionBatch(
        prompt_input_ids=batch.prompt_input_ids[sl], prompt_attention_mask=batch.prompt_attention_mask[sl],
        completion_input_ids=batch.completion_input_ids[sl], completion_mask=batch.completion_mask[sl],
        extras={k: v[sl] for k, v in batch.extras.items()},
    )


_SOURCES = {
    "sequence": SequenceRMSource,
    "sentence": SentenceRMSource,
    "token": TokenRMSource,
    "discriminator": DiscriminatorSource,
}


def make_reward_source(model, policy_tokenizer, **options: Any) -> RewardModelSource:
    """The source for a reward model of any level.

    Args:
        model: a :class:`~finegrain.models.reward_model.RewardModel`.
        policy_tokenizer: the tokenizer of the batches to score.
        **options: the source's options (``spread``, ``prompt_term`` for the sentence level, ``reduce`` for token
            levels, ``seq_reward`` for the sequence level, ``mode``, ``eos``, ``neutral_band``, ``positive_value``,
            ``negative_value``, ``seed`` for the discriminator; ``name``, ``batch_size``, ``max_length`` for all).

    Returns:
        The source.

    Raises:
        ConfigError: an option the level does not take.
    """
    cls = _SOURCES.get(getattr(model, "level", None))
    if cls is None:
        raise ConfigError(f"{type(model).__name__} is not a finegrain reward model")
    try:
        return cls(model, policy_tokenizer, **options)
    except TypeError as err:
        raise ConfigError(f"{cls.__name__}: {err}") from None
