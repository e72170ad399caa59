"""Reward-model sources: placement in the policy's layout, cross-tokenizer mapping through character offsets (two
different tiny tokenizers), save/load round trip through load_reward_source, the non-finite check."""

import doctest
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import finegrain.rewards.models as rm_sources
from finegrain.data.collate import collate_completions
from finegrain.data.tokenize import tokenize_prompt, tokenize_response
from finegrain.errors import ConfigError, NonFiniteError
from finegrain.models.build import causal_lm_from_config, tiny_llama_config
from finegrain.models.reward_model import PunctuationSplitter, build_reward_model, save_reward_model
from finegrain.rewards.base import RewardSource
from finegrain.rewards.models import (
    DiscriminatorSource,
    SentenceRMSource,
    SequenceRMSource,
    TokenRMSource,
    decode_with_offsets,
    make_reward_source,
    map_token_values,
    sentence_token_groups,
)
from finegrain.rewards.registry import load_reward_source, registered_sources

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from _tiny_tokenizers import bpe_tokenizer, word_tokenizer  # noqa: E402

PROMPTS = ["what color is the sky ?", "the cat"]
RESPONSES = ["the sky is blue . the mat is red .", "sat on the mat ."]


def test_doctests():
    assert doctest.testmod(rm_sources, raise_on_error=False).failed == 0


def backbone(tok, seed=0):
    cfg = tiny_llama_config(len(tok) + 8, hidden_size=32, num_heads=4, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=64)
    return causal_lm_from_config(cfg, seed=seed).eval()


def policy_batch(tok, responses=RESPONSES, prompts=PROMPTS):
    rows = []
    for p, r in zip(prompts, responses):
        ids, _, _ = tokenize_response(tok, r)
        rows.append({"prompt_input_ids": tokenize_prompt(tok, p), "completion_input_ids": ids})
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return collate_completions(rows, pad)


def rm(level, tok=None, **kw):
    tok = tok or word_tokenizer()
    kw.setdefault("splitter", PunctuationSplitter())
    return build_reward_model(level, backbone(tok), tok, embed_dim=8, seed=3, **kw).eval()


# ------------------------------------------------------------------------------------------------ pure mapping


def naive_map(values, src, dst, reduce, end_index):
    """Each source token goes to the first destination token whose end is >= its end; trailing empty tokens to
    end_index; a loop over pairs."""
    text_end = max([e for _, e in dst] + [e for _, e in src])
    out = [0.0] * len(dst)
    counts = [0] * len(dst)
    for v, (s, e) in zip(values, src):
        if s == e and e >= text_end:
            j = end_index
        else:
            j = next((k for k, (_, de) in enumerate(dst) if de >= e), len(dst) - 1)
            j = min(j, end_index)
        out[j] += v
        counts[j] += 1
    if reduce == "mean":
        out = [o / max(c, 1) for o, c in zip(out, counts)]
    return out


def random_offsets(rng, text_len, n_cuts, trailing_empty):
    cuts = sorted(set(rng.choice(np.arange(1, text_len), size=min(n_cuts, text_len - 1), replace=False).tolist()))
    bounds = [0, *cuts, text_len]
    offs = [(a, b) for a, b in zip(bounds, bounds[1:])]
    return offs + [(text_len, text_len)] * trailing_empty


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_map_token_values_matches_a_naive_loop(reduce):
    rng = np.random.default_rng(0)
    for _ in range(200):
        L = int(rng.integers(2, 40))
        src = random_offsets(rng, L, int(rng.integers(1, 12)), int(rng.integers(0, 2)))
        dst = random_offsets(rng, L, int(rng.integers(1, 12)), int(rng.integers(0, 2)))
        values = rng.normal(size=len(src))
        end = len(dst) - 1 - int(rng.integers(0, 2) if len(dst) > 1 else 0)
        got = map_token_values(values, src, dst, reduce=reduce, end_index=end)
        np.testing.assert_allclose(got, naive_map(values, src, dst, reduce, end), atol=1e-12)
        if reduce == "sum":  # nothing is lost: the total is preserved
            assert got.sum() == pytest.approx(values.sum())


def test_decode_with_offsets_spans_tile_the_text_for_a_byte_level_bpe():
    tok = bpe_tokenizer()
    text = "héllo wörld, naïve café 你好 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    out, offs = decode_with_offsets(tok, ids)
    assert out == text
    assert offs[-1] == (len(text), len(text))  # EOS: empty, at the end
    assert offs[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offs, offs[1:]))  # contiguous
    assert offs[-2][1] == len(text)
    # a token that ends inside a multi-byte character covers nothing; the next one covers the character
    for t, (s, e) in enumerate(offs[:-1]):
        prefix = tok.decode(ids[: t + 1], skip_special_tokens=True)
        assert e == len(prefix) if text.startswith(prefix) else e == s


def test_sentence_token_groups_by_hand():
    # spans "a b" "c" "d e" ; boundaries close span 0 and spans 1-2 (span 1 folded into the second group)
    spans, groups = [(0, 3), (4, 5), (6, 9)], [0, 2]
    offs = [(0, 1), (1, 3), (3, 5), (5, 9), (9, 9)]
    ends, token_groups = sentence_token_groups(spans, groups, offs)
    assert token_groups == [0, 0, 1, 1, -1] and ends == [1, 3]


# ------------------------------------------------------------------------------------------------ same tokenizer


def test_sources_follow_the_protocol_and_placement():
    tok = word_tokenizer()
    batch = policy_batch(tok)
    mask = batch.completion_mask
    last = mask.sum(1) - 1
    seq = rm("sequence", tok)
    src = make_reward_source(seq, tok)
    assert isinstance(src, SequenceRMSource) and isinstance(src, RewardSource)
    out = src.token_rewards(batch)
    with torch.no_grad():
        scores = seq.score(batch)
    torch.testing.assert_close(out.meta["scores"], scores)
    for i in range(2):  # the score sits on the last valid token (EOS), nothing elsewhere
        assert out.values[i, last[i]] == pytest.approx(scores[i].item(), abs=1e-6)
        assert out.values[i].abs().sum() == pytest.approx(abs(scores[i].item()), abs=1e-6)
    assert out.seq_reward is None
    alt = SequenceRMSource(seq, tok, seq_reward=True).token_rewards(batch)
    assert (alt.values == 0).all() and torch.allclose(alt.seq_reward, scores)

    tok_rm = rm("token", tok)
    out = TokenRMSource(tok_rm, tok, batch_size=1).token_rewards(batch)
    with torch.no_grad():
        torch.testing.assert_close(out.values, tok_rm.token_values(batch), atol=1e-6, rtol=1e-6)
    disc = rm("discriminator", tok)
    out = DiscriminatorSource(disc, tok).token_rewards(batch)
    with torch.no_grad():
        own = disc.token_values(batch)
    eos = (batch.completion_input_ids == tok.eos_token_id) & mask
    assert eos.sum() == 2 and (out.values[eos] == 0).all()  # the end token gets 0 (the official code), ...
    torch.testing.assert_close(out.values, torch.where(eos, 0.0, own), atol=1e-6, rtol=1e-6)
    assert (own[eos] != 0).all()  # ... where the model itself says something
    kept = DiscriminatorSource(disc, tok, eos="model").token_rewards(batch)
    torch.testing.assert_close(kept.values, own, atol=1e-6, rtol=1e-6)
    assert (out.values.abs() < 1).all() and (out.values[~mask] == 0).all()


@pytest.mark.parametrize("spread", [False, True])
def test_sentence_source_places_terms_on_sentence_ends_or_spreads_them(spread):
    tok = word_tokenizer()
    batch = policy_batch(tok)
    model = rm("sentence", tok, boundary_mode="insert")
    out = SentenceRMSource(model, tok, spread=spread).token_rewards(batch)
    assert out.meta["num_sentences"].tolist() == [2, 1]
    # the response terms sum to R minus the prompt term a_0 s_0 (docs/methods/reward-models.md)
    want = out.meta["scores"] - out.meta["prompt_terms"]
    torch.testing.assert_close(out.values.sum(1), want, atol=1e-5, rtol=1e-5)
    row0 = out.values[0]
    # row 0: "the sky is blue ." "the mat is red ." EOS
    if spread:
        assert torch.allclose(row0[:5], row0[0].expand(5)) and torch.allclose(row0[5:10], row0[5].expand(5))
        assert row0[10] == 0
    else:
        assert row0.nonzero().flatten().tolist() == [4, 9]  # the two periods
    full = SentenceRMSource(model, tok, spread=spread, prompt_term=True).token_rewards(batch)
    torch.testing.assert_close(full.values.sum(1), out.meta["scores"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ across tokenizers


def naive_policy_values(rm_values, rm_offsets, pol_offsets, n_policy, reduce):
    """For each policy token: the RM tokens whose last character it holds (trailing empty ones: its last token)."""
    return naive_map(rm_values, rm_offsets, pol_offsets, reduce, n_policy - 1)


@pytest.mark.parametrize("level", ["token", "discriminator"])
def test_token_rewards_move_to_another_tokenizer_through_character_offsets(level):
    word, bpe = word_tokenizer(), bpe_tokenizer()
    model = rm(level, word)
    texts = ["the cat sat on the mat .", "what color is the sky ?"]
    batch = policy_batch(bpe, texts, ["the cat", "the sky"])
    source = make_reward_source(model, bpe)
    assert not source.same_tokenizer
    out = source.token_rewards(batch)
    reduce = "sum" if level == "token" else "mean"
    for i, (prompt, text) in enumerate(zip(["the cat", "the sky"], texts)):
        rm_ids, rm_offs, _ = tokenize_response(word, text)
        rm_batch = collate_completions([{"prompt_input_ids": tokenize_prompt(word, prompt),
                                         "completion_input_ids": rm_ids}], word.pad_token_id)
        with torch.no_grad():
            rm_values = model.token_values(rm_batch)[0].tolist()
        n = int(batch.completion_mask[i].sum())
        _, pol_offs = decode_with_offsets(bpe, batch.completion_input_ids[i, :n].tolist())
        if level == "discriminator":  # the end token gets 0 (the official code's choice) in the RM's tokens
            rm_values[-1] = 0.0
        want = naive_policy_values(rm_values, rm_offs, pol_offs, n, reduce)
        np.testing.assert_allclose(out.values[i, :n].numpy(), want, atol=1e-5)
        if level == "token":  # additive rewards keep their total
            assert out.values[i].sum().item() == pytest.approx(sum(rm_values), abs=1e-5)
        # the RM's EOS reward lands on the policy's EOS (the discriminator's: 0)
        assert out.values[i, n - 1].item() == pytest.approx(want[-1], abs=1e-6)
        assert batch.completion_input_ids[i, n - 1] == bpe.eos_token_id
        if level == "discriminator":
            assert out.values[i, n - 1] == 0


def test_sequence_score_across_tokenizers_equals_scoring_the_text_directly():
    word, bpe = word_tokenizer(), bpe_tokenizer()
    model = rm("sequence", word)
    texts = ["the cat sat on the mat .", "what color is the sky ?"]
    out = make_reward_source(model, bpe).token_rewards(policy_batch(bpe, texts, ["the cat", "the sky"]))
    direct = policy_batch(word, texts, ["the cat", "the sky"])
    with torch.no_grad():
        torch.testing.assert_close(out.meta["scores"], model.score(direct), atol=1e-5, rtol=1e-5)


def test_sentence_source_across_tokenizers_puts_terms_on_the_policy_token_ending_each_sentence():
    word, bpe = word_tokenizer(), bpe_tokenizer()
    model = rm("sentence", word, boundary_mode="mark")
    text = "the cat sat on the mat . the sky is blue ."
    batch = policy_batch(bpe, [text], ["the cat"])
    out = SentenceRMSource(model, bpe).token_rewards(batch)
    n = int(batch.completion_mask[0].sum())
    _, offs = decode_with_offsets(bpe, batch.completion_input_ids[0, :n].tolist())
    ends = [max(k for k, (s, e) in enumerate(offs) if s < stop and e > s) for stop in (24, len(text))]
    nonzero = out.values[0].nonzero().flatten().tolist()
    assert set(nonzero) <= set(ends) and out.meta["num_sentences"].tolist() == [2]


# ------------------------------------------------------------------------------------------- registry, errors


def test_load_reward_source_round_trip_gives_identical_rewards(tmp_path):
    tok = word_tokenizer()
    batch = policy_batch(tok)
    for level in ("sequence", "sentence", "token", "discriminator"):
        model = rm(level, word_tokenizer())
        want = make_reward_source(model, tok).token_rewards(batch)
        path = save_reward_model(model, tmp_path / level)
        got = load_reward_source(path, policy_tokenizer=tok).token_rewards(batch)
        torch.testing.assert_close(got.values, want.values, atol=0, rtol=0)
        # a run directory works too (its final/ is used)
        run = tmp_path / f"run-{level}"
        save_reward_model(model, run / "final")
        got = load_reward_source(run, policy_tokenizer=tok, name="x").token_rewards(batch)
        torch.testing.assert_close(got.values, want.values, atol=0, rtol=0)


def test_registry_errors_and_names(tmp_path):
    tok = word_tokenizer()
    with pytest.raises(ConfigError, match="not a directory"):
        load_reward_source("no-such-thing", policy_tokenizer=tok)
    with pytest.raises(ConfigError, match="no finegrain_reward.json"):
        load_reward_source(tmp_path, policy_tokenizer=tok)
    path = save_reward_model(rm("token", word_tokenizer()), tmp_path / "rm")
    with pytest.raises(ConfigError, match="spread"):
        load_reward_source(path, policy_tokenizer=tok, spread=True)
    assert {"python", "contrastive", "implicit"} <= set(registered_sources())


def test_non_finite_rewards_name_the_source():
    tok = word_tokenizer()
    model = rm("token", tok)
    with torch.no_grad():
        model.head.proj.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="my_rm"):
        TokenRMSource(model, tok, name="my_rm").token_rewards(policy_batch(tok))
