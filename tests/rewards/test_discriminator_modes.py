"""The TLCR discriminator reward source's options (reward mode, end-of-response token, neutral band, values, seed)
and how a reward spec passes them (``DIR:KEY=VALUE``), against the pure reward function and by hand."""

import sys
from pathlib import Path

import pytest
import torch

from finegrain.errors import ConfigError
from finegrain.losses.token_cls import OFFICIAL_NEUTRAL_BAND, TLCR_REWARD_MODES, tlcr_token_rewards
from finegrain.models.reward_model import build_reward_model, save_reward_model
from finegrain.rewards.models import DiscriminatorSource, TokenRMSource
from finegrain.rewards.registry import (
    SourceContext,
    reward_source,
    reward_sources,
    split_dir_options,
    split_name,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from _tiny_tokenizers import bpe_tokenizer, word_tokenizer  # noqa: E402
from test_rm_sources import backbone, policy_batch  # noqa: E402


def disc(tok=None, **kw):
    tok = tok or word_tokenizer()
    return build_reward_model("discriminator", backbone(tok), tok, seed=3, **kw).eval()


@pytest.mark.parametrize("mode", TLCR_REWARD_MODES)
def test_every_mode_through_the_source_equals_the_pure_function_with_eos_zero(mode):
    tok = word_tokenizer()
    model = disc(tok)
    batch = policy_batch(tok)
    with torch.no_grad():
        logits = model(batch)
    eos = (batch.completion_input_ids == tok.eos_token_id) & batch.completion_mask.bool()
    got = DiscriminatorSource(model, tok, mode=mode, seed=5).token_rewards(batch)
    want = tlcr_token_rewards(logits, batch.completion_mask, mode=mode, end_mask=eos,
                              generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got.values, want.float(), atol=1e-6, rtol=1e-6)
    assert (got.values[eos] == 0).all() and (got.values[~batch.completion_mask.bool()] == 0).all()
    torch.testing.assert_close(got.meta["scores"], got.values.sum(1), atol=1e-6, rtol=1e-6)


def test_source_options_band_values_lag_and_the_model_flags():
    tok = word_tokenizer()
    batch = policy_batch(tok)
    model = disc(tok, double_softmax=True, lag=1)
    with torch.no_grad():
        logits = model(batch)
    eos = (batch.completion_input_ids == tok.eos_token_id) & batch.completion_mask.bool()
    got = DiscriminatorSource(model, tok, mode="sign", neutral_band=0.05, positive_value=0.5,
                              negative_value=-2.0).token_rewards(batch)
    want = tlcr_token_rewards(logits, batch.completion_mask, mode="sign", end_mask=eos, neutral_band=0.05,
                              positive_value=0.5, negative_value=-2.0, double_softmax_compat=True, lag=1)
    torch.testing.assert_close(got.values, want.float())
    assert set(got.values.unique().tolist()) <= {0.0, 0.5, -2.0}
    # lag 1 with the end token zeroed: the EOS action carries the last content token's score (the official code)
    cont = DiscriminatorSource(model, tok).token_rewards(batch).values
    with torch.no_grad():
        raw = tlcr_token_rewards(logits, batch.completion_mask, double_softmax_compat=True)
    for i in range(batch.num_rows):
        n = int(batch.completion_mask[i].sum())
        assert cont[i, n - 1].item() == pytest.approx(raw[i, n - 2].item(), abs=1e-6)
        assert cont[i, 0] == 0
    assert DiscriminatorSource(model, tok).neutral_band == OFFICIAL_NEUTRAL_BAND


def test_random_mode_is_reproducible_by_seed_and_advances():
    tok = word_tokenizer()
    model = disc(tok)
    batch = policy_batch(tok)
    a = DiscriminatorSource(model, tok, mode="random", seed=1)
    b = DiscriminatorSource(model, tok, mode="random", seed=1)
    first = a.token_rewards(batch).values
    torch.testing.assert_close(first, b.token_rewards(batch).values, rtol=0, atol=0)
    assert not torch.equal(first, a.token_rewards(batch).values)  # the stream moves on
    assert not torch.equal(first, DiscriminatorSource(model, tok, mode="random", seed=2).token_rewards(batch).values)


@pytest.mark.parametrize("mode", ["sign", "positive"])
def test_modes_across_tokenizers_score_in_the_reward_models_tokens_and_map_by_mean(mode):
    """Through the text, the mode applies to the RM's own tokens (its EOS zeroed), then each policy token takes the
    mean of the RM tokens read completely at it (naive loop of test_rm_sources)."""
    from test_rm_sources import naive_map

    from finegrain.data.collate import collate_completions
    from finegrain.data.tokenize import tokenize_prompt, tokenize_response
    from finegrain.rewards.models import decode_with_offsets

    word, bpe = word_tokenizer(), bpe_tokenizer()
    model = disc(word)
    texts, prompts = ["the cat sat on the mat .", "what color is the sky ?"], ["the cat", "the sky"]
    batch = policy_batch(bpe, texts, prompts)
    out = DiscriminatorSource(model, bpe, mode=mode).token_rewards(batch)
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        ids, offs, _ = tokenize_response(word, text)
        rm_batch = collate_completions([{"prompt_input_ids": tokenize_prompt(word, prompt),
                                         "completion_input_ids": ids}], word.pad_token_id)
        with torch.no_grad():
            logits = model(rm_batch)
        eos = rm_batch.completion_input_ids == word.eos_token_id
        rm_values = tlcr_token_rewards(logits, rm_batch.completion_mask, mode=mode, end_mask=eos)[0].tolist()
        n = int(batch.completion_mask[i].sum())
        _, pol_offs = decode_with_offsets(bpe, batch.completion_input_ids[i, :n].tolist())
        want = naive_map(rm_values, offs, pol_offs, "mean", n - 1)
        assert out.values[i, :n].tolist() == pytest.approx(want, abs=1e-6)
        assert out.values[i, n - 1] == 0  # the policy's EOS


def test_bad_source_options():
    tok = word_tokenizer()
    model = disc(tok)
    with pytest.raises(ConfigError, match="mode"):
        DiscriminatorSource(model, tok, mode="binary")
    with pytest.raises(ConfigError, match="eos"):
        DiscriminatorSource(model, tok, eos="drop")
    with pytest.raises(ConfigError, match="neutral_band"):
        DiscriminatorSource(model, tok, neutral_band=2.0)


# ------------------------------------------------------------------------------------------------ spec options


def test_split_name_and_dir_options(tmp_path):
    d = tmp_path / "rm"
    d.mkdir()
    assert split_name(f"{d}:mode=sign") == (None, f"{d}:mode=sign")
    assert split_name(f"x={d}:mode=sign") == ("x", f"{d}:mode=sign")
    assert split_name("tdpo=implicit:runs/po") == ("tdpo", "implicit:runs/po")
    assert split_dir_options(f"{d}:mode=sign:eos=model:neutral_band=0.2:seed=3:positive_value=2") == (
        str(d), {"mode": "sign", "eos": "model", "neutral_band": 0.2, "seed": 3, "positive_value": 2})
    assert split_dir_options(f"{d}:double_softmax=true:lag=1") == (str(d), {"double_softmax": True, "lag": 1})
    assert split_dir_options(f"{d}") is None and split_dir_options("oracle:credit") is None
    assert split_dir_options(f"{d}:mode") is None  # not KEY=VALUE: not a directory spec
    colon = tmp_path / "a:b"
    colon.mkdir()
    assert split_dir_options(f"{colon}:mode=fixed") == (str(colon), {"mode": "fixed"})
    with pytest.raises(ConfigError, match="twice"):
        split_dir_options(f"{d}:mode=sign:mode=fixed")


def test_reward_specs_pass_options_to_the_discriminator_source(tmp_path):
    tok = word_tokenizer()
    path = save_reward_model(disc(word_tokenizer()), tmp_path / "run" / "final")
    batch = policy_batch(tok)
    ctx = SourceContext(tokenizer=tok)
    plain = reward_source(str(tmp_path / "run"), ctx)
    assert isinstance(plain, DiscriminatorSource) and plain.mode == "continuous" and plain.eos == "zero"
    assert plain.name == "run"
    sign = reward_source(f"{tmp_path / 'run'}:mode=sign:eos=model", ctx)
    assert (sign.mode, sign.eos) == ("sign", "model")
    want = DiscriminatorSource(plain.model, tok, mode="sign", eos="model").token_rewards(batch).values
    torch.testing.assert_close(sign.token_rewards(batch).values, want, rtol=0, atol=0)
    named = reward_source(f"d={path}:mode=positive:seed=4", ctx)
    assert named.name == "d" and named.mode == "positive" and named.seed == 4
    # the model's loader options work the same way, and spec options win over the context's
    lagged = reward_source(f"{path}:lag=1", SourceContext(tokenizer=tok, model_options={"lag": 0, "mode": "fixed"}))
    assert lagged.model.lag == 1 and lagged.mode == "fixed"
    many = reward_sources([f"{path}:mode=sign", f"{path}:mode=fixed"], ctx)
    assert [s.mode for s in many.values()] == ["sign", "fixed"]
    with pytest.raises(ConfigError, match="nope"):
        reward_source(f"{path}:nope=1", ctx)
    with pytest.raises(ConfigError, match="mode"):
        reward_source(f"{path}:mode=binary", ctx)
    # a token RM takes no discriminator option
    tpath = save_reward_model(build_reward_model("token", backbone(tok), tok, seed=1), tmp_path / "tok")
    assert isinstance(reward_source(str(tpath), ctx), TokenRMSource)
    with pytest.raises(ConfigError, match="mode"):
        reward_source(f"{tpath}:mode=sign", ctx)
