"""Reward models on a tiny causal LM: each level against the backbone run row by row without padding, sentence
preparation (insert / mark modes, merging past max_sentences), save/load round trips (plain and LoRA), errors."""

import json
import sys
from pathlib import Path

import pytest
import torch

from finegrain.data.collate import collate_completions
from finegrain.data.tokenize import tokenize_prompt, tokenize_response
from finegrain.errors import ConfigError
from finegrain.losses.token_cls import expected_label_rewards, tlcr_token_rewards
from finegrain.models.build import causal_lm_from_config, tiny_llama_config
from finegrain.models.reward_model import (
    CONFIG_FILE,
    PunctuationSplitter,
    SentenceRewardModel,
    build_reward_model,
    collate_sentence_examples,
    load_reward_model,
    save_reward_model,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from _tiny_tokenizers import word_tokenizer  # noqa: E402

PROMPTS = ["what color is the sky ?", "the cat"]
RESPONSES = ["the sky is blue . the mat is red .", "sat on the mat ."]


def backbone(tok, seed=0, spare=8):
    cfg = tiny_llama_config(len(tok) + spare, hidden_size=32, num_heads=4, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return causal_lm_from_config(cfg, seed=seed).eval()


def rows(tok):
    out = []
    for p, r in zip(PROMPTS, RESPONSES):
        ids, offs, _ = tokenize_response(tok, r)
        out.append({"prompt_input_ids": tokenize_prompt(tok, p), "completion_input_ids": ids, "offsets": offs,
                    "text": r})
    return out


def batch_of(tok, items):
    return collate_completions([{k: it[k] for k in ("prompt_input_ids", "completion_input_ids")} for it in items],
                               tok.pad_token_id)


def alone_hidden(model, prompt_ids, response_ids):
    """Final hidden states of one unpadded row, through the plain HF forward."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        return model.backbone(ids, output_hidden_states=True).hidden_states[-1][0]


@pytest.mark.parametrize("score_bias", [False, True])
def test_sequence_score_is_the_head_at_the_last_response_token(score_bias):
    tok = word_tokenizer()
    model = build_reward_model("sequence", backbone(tok), tok, seed=1, score_bias=score_bias).eval()
    assert (model.head.proj.bias is not None) is score_bias  # bias-free by default (TRL's score head)
    items = rows(tok)
    with torch.no_grad():
        scores = model(batch_of(tok, items))
    for i, it in enumerate(items):
        h = alone_hidden(model, it["prompt_input_ids"], it["completion_input_ids"])
        want = h[-1] @ model.head.proj.weight[0] + (model.head.proj.bias[0] if score_bias else 0.0)
        torch.testing.assert_close(scores[i], want, atol=1e-5, rtol=1e-5)


def test_bradley_terry_gives_a_score_bias_no_gradient_so_the_default_head_has_none():
    """BT depends on r_w − r_l only: d/db of −log σ((w·h_w + b) − (w·h_l + b)) is exactly 0 in float64, while w
    gets the usual gradient; the default head has no b to drift, and a shift of every score leaves the loss alone."""
    from finegrain.losses.bt import bradley_terry_loss
    from finegrain.models.heads import ScalarHead

    g = torch.Generator().manual_seed(0)
    head = ScalarHead(6, bias=True).double()
    h_w, h_l = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    bradley_terry_loss(head(h_w), head(h_l)).losses.mean().backward()
    assert head.proj.bias.grad.abs().item() < 1e-15 and head.proj.weight.grad.abs().sum() > 1e-3
    # by hand: d/dw mean_i −log σ(w·(h_w − h_l)_i) = −mean_i σ(−m_i) (h_w − h_l)_i
    m = (h_w - h_l) @ head.proj.weight[0]
    want = -(torch.sigmoid(-m)[:, None] * (h_w - h_l)).mean(0)
    torch.testing.assert_close(head.proj.weight.grad[0], want, rtol=0, atol=1e-14)
    shifted = bradley_terry_loss(head(h_w) + 3.0, head(h_l) + 3.0).losses
    torch.testing.assert_close(shifted, bradley_terry_loss(head(h_w), head(h_l)).losses, rtol=0, atol=1e-13)


def test_sequence_heads_with_and_without_bias_save_and_load_and_old_directories_still_load(tmp_path):
    tok = word_tokenizer()
    b = batch_of(tok, rows(tok))
    for score_bias in (False, True):
        model = build_reward_model("sequence", backbone(tok), tok, seed=2, score_bias=score_bias).eval()
        path = save_reward_model(model, tmp_path / f"rm-{score_bias}")
        assert json.loads((path / CONFIG_FILE).read_text())["head"]["bias"] is score_bias
        loaded = load_reward_model(path)
        assert (loaded.head.proj.bias is not None) is score_bias
        with torch.no_grad():
            torch.testing.assert_close(loaded.score(b), model.score(b), atol=0, rtol=0)
    # a directory saved before the bias-free default: its head config has no "bias" entry and its head a bias
    old = tmp_path / "rm-True"
    info = json.loads((old / CONFIG_FILE).read_text())
    del info["head"]["bias"]
    (old / CONFIG_FILE).write_text(json.dumps(info))
    loaded = load_reward_model(old)
    assert loaded.head.proj.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(b), model.score(b), atol=0, rtol=0)


@pytest.mark.parametrize("num_outputs", [1, 3])
def test_token_rm_values_are_the_head_on_the_reading_states(num_outputs):
    tok = word_tokenizer()
    model = build_reward_model("token", backbone(tok), tok, num_outputs=num_outputs, seed=2).eval()
    items = rows(tok)
    b = batch_of(tok, items)
    with torch.no_grad():
        values = model.token_values(b)
    assert values.shape == b.completion_mask.shape
    assert (values[~b.completion_mask] == 0).all()
    for i, it in enumerate(items):
        P, n = len(it["prompt_input_ids"]), len(it["completion_input_ids"])
        h = alone_hidden(model, it["prompt_input_ids"], it["completion_input_ids"])[P : P + n]
        out = model.head(h)
        want = expected_label_rewards(out) if num_outputs == 3 else out
        torch.testing.assert_close(values[i, :n], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.score(b)[i], want.sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("double_softmax,lag", [(False, 0), (True, 1)])
def test_discriminator_rewards_follow_the_tlcr_formula(double_softmax, lag):
    tok = word_tokenizer()
    model = build_reward_model("discriminator", backbone(tok), tok, double_softmax=double_softmax, lag=lag,
                               seed=3).eval()
    b = batch_of(tok, rows(tok))
    with torch.no_grad():
        logits = model(b)
        values = model.token_values(b)
    assert logits.shape == (*b.completion_mask.shape, 2)
    torch.testing.assert_close(values, tlcr_token_rewards(logits, b.completion_mask,
                                                          double_softmax_compat=double_softmax, lag=lag))
    if not double_softmax:  # hand check on one token: 2σ(z1 − z0) − 1
        z = logits[0, 0]
        assert values[0, 0].item() == pytest.approx((2 * torch.sigmoid(z[1] - z[0]) - 1).item(), abs=1e-6)


def test_insert_mode_adds_end_token_and_resizes_to_a_multiple_of_8():
    tok = word_tokenizer()
    bb = backbone(tok, spare=0)  # no room for <END>: the embedding must grow
    n0 = len(tok)
    model = build_reward_model("sentence", bb, tok, boundary_mode="insert", embed_dim=8, seed=0)
    assert len(tok) == n0 + 1 and model.end_token_id == tok.convert_tokens_to_ids("<END>")
    assert bb.get_input_embeddings().weight.shape[0] % 8 == 0
    assert bb.get_input_embeddings().weight.shape[0] >= len(tok)


def test_sentence_prepare_insert_and_mark_modes():
    tok = word_tokenizer()
    it = rows(tok)[0]  # "the sky is blue . the mat is red ." -> 10 word tokens + EOS
    ins = build_reward_model("sentence", backbone(tok), tok, boundary_mode="insert", embed_dim=8,
                             splitter=PunctuationSplitter())
    ex = ins.prepare(it["prompt_input_ids"], it["completion_input_ids"], it["text"], it["offsets"])
    end = ins.end_token_id
    ids = it["completion_input_ids"]
    # prompt <END> | the sky is blue . <END> the mat is red . EOS <END>
    assert ex.prompt_input_ids == it["prompt_input_ids"] + [end]
    assert ex.completion_input_ids == ids[:5] + [end] + ids[5:] + [end]
    assert ex.boundaries == [5, 12] and ex.groups == [0, 1] and len(ex.spans) == 2
    mark = build_reward_model("sentence", backbone(tok), word_tokenizer(), boundary_mode="mark", embed_dim=8,
                              splitter=PunctuationSplitter())
    ex = mark.prepare(it["prompt_input_ids"], ids, it["text"], it["offsets"])
    assert ex.completion_input_ids == ids and ex.boundaries == [4, 9]
    # the default rule splitter reads a period before a lowercase word as the sentence going on
    rule = build_reward_model("sentence", backbone(tok), word_tokenizer(), boundary_mode="mark", embed_dim=8)
    assert rule.prepare(it["prompt_input_ids"], ids, it["text"], it["offsets"]).boundaries == [9]


def test_sentences_past_max_sentences_are_merged_into_the_last_boundary():
    tok = word_tokenizer()
    text = "a . b . c . d ."
    ids, offs, _ = tokenize_response(tok, text)
    model = build_reward_model("sentence", backbone(tok), tok, boundary_mode="mark", embed_dim=8, max_sentences=3,
                               splitter=PunctuationSplitter())
    ex = model.prepare([tok.bos_token_id], ids, text, offs)
    # 4 sentences, room for 2 response boundaries: sentence 1, then sentences 2-4 together
    assert ex.boundaries == [1, 7] and ex.groups == [0, 3]


def test_sentence_score_in_a_padded_batch_equals_each_row_alone():
    tok = word_tokenizer()
    model = build_reward_model("sentence", backbone(tok), tok, boundary_mode="insert", embed_dim=8, seed=4,
                               splitter=PunctuationSplitter()).eval()
    items = rows(tok)
    examples = [model.prepare(it["prompt_input_ids"], it["completion_input_ids"], it["text"], it["offsets"])
                for it in items]
    with torch.no_grad():
        out = model(collate_sentence_examples(examples, tok.pad_token_id))
        for i, ex in enumerate(examples):
            alone = model(collate_sentence_examples([ex], tok.pad_token_id))
            torch.testing.assert_close(out.score[i], alone.score[0], atol=1e-5, rtol=1e-5)
            # the head reads the hidden states at e_0 (last prompt token) and at the inserted <END> tokens
            h = alone_hidden(model, ex.prompt_input_ids, ex.completion_input_ids)
            P = len(ex.prompt_input_ids)
            rows_at = h[[P - 1] + [P + b for b in ex.boundaries]]
            assert all((ex.prompt_input_ids + ex.completion_input_ids)[p] == model.end_token_id
                       for p in [P - 1] + [P + b for b in ex.boundaries])
            want = model.head(rows_at.unsqueeze(0), boundary_mask=torch.ones(1, len(rows_at), dtype=torch.bool))
            torch.testing.assert_close(out.score[i], want.score[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.terms[i].sum(), out.score[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("level", ["sequence", "sentence", "token", "discriminator"])
def test_save_load_round_trip_gives_identical_scores(level, tmp_path):
    tok = word_tokenizer()
    model = build_reward_model(level, backbone(tok), tok, embed_dim=8, seed=5, lag=1 if level == "discriminator" else 0,
                               splitter=PunctuationSplitter(min_chars=3))
    model.eval()
    items = rows(tok)
    if level == "sentence":
        b = collate_sentence_examples([model.prepare(it["prompt_input_ids"], it["completion_input_ids"], it["text"],
                                                     it["offsets"]) for it in items], tok.pad_token_id)
    else:
        b = batch_of(tok, items)
    path = save_reward_model(model, tmp_path / "rm")
    info = json.loads((path / CONFIG_FILE).read_text())
    assert info["level"] == level and info["head"]["hidden_size"] == 32
    assert (path / "model.safetensors").is_file() and (path / "reward_head.safetensors").is_file()
    loaded = load_reward_model(path)
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(b), model.score(b), atol=0, rtol=0)
    if level == "sentence":
        assert loaded.boundary_mode == "insert" and loaded.end_token_id == model.end_token_id
        assert loaded.splitter == PunctuationSplitter(min_chars=3)
    if level == "discriminator":
        assert loaded.lag == 1
        assert load_reward_model(path, lag=0).lag == 0


def test_lora_backbone_is_saved_merged_with_the_same_outputs(tmp_path):
    from finegrain.models.build import apply_lora

    tok = word_tokenizer()
    model = build_reward_model("token", backbone(tok), tok, seed=6)
    model.backbone = apply_lora(model.backbone, 4, 8, 0.0, ["all-linear"])
    with torch.no_grad():  # make the adapter do something
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    b = batch_of(tok, rows(tok))
    with torch.no_grad():
        want = model.token_values(b)
    path = save_reward_model(model, tmp_path / "rm")
    assert json.loads((path / CONFIG_FILE).read_text())["peft_merged"] is True
    assert hasattr(model.backbone, "peft_config")  # the trained model is left as it was
    loaded = load_reward_model(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.token_values(b), want, atol=1e-5, rtol=1e-5)


def test_flat_checkpoint_holds_every_parameter_once(tmp_path):
    from safetensors.torch import load_file

    tok = word_tokenizer()
    model = build_reward_model("sequence", backbone(tok), tok, seed=7)
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "reward_model.safetensors"))
    own = model.state_dict()
    # the tied output embedding is stored once, under the input embedding's key
    assert set(own) - set(weights) == {"backbone.lm_head.weight"}
    for k, v in weights.items():
        torch.testing.assert_close(v, own[k])


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="not a finegrain reward model"):
        load_reward_model(tmp_path)
    with pytest.raises(ConfigError, match="unknown reward-model level"):
        build_reward_model("paragraph", backbone(word_tokenizer()), word_tokenizer())
    tok = word_tokenizer()
    with pytest.raises(ConfigError, match="<END>"):
        SentenceRewardModel(backbone(tok), tok, build_reward_model("sentence", backbone(tok), word_tokenizer(),
                                                                   boundary_mode="mark", embed_dim=8).head)
