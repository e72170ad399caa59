import contextlib
import logging
import warnings

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from finegrain.rl.rollout import (
    left_pad_prompts,
    resolve_special_ids,
    sample_next_token,
    sample_prompts,
    sample_rollouts,
    score_rollout,
)
from finegrain.types import CompletionBatch

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
WORDS = ("the a cat dog sat ran on under mat rug big small red blue and then it was very quite happy sad "
         "today here there quickly slowly jumped slept ate food water home park").split()
PROMPTS = ["[BOS] the cat sat on the mat", "[BOS] a dog", "[BOS] it was very happy today and then"]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", unk_token="[UNK]", padding_side="left")


def _llama(vocab_size, seed):
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _llama(len(tokenizer), seed=0)


@pytest.fixture(scope="module")
def ref_model(tokenizer):
    return _llama(len(tokenizer), seed=1)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@contextlib.contextmanager
def _eos_logits(model, plan):
    """Override the EOS logit per decoding step: ``plan(step) -> (N,) float`` added to column EOS."""
    calls = {"step": 0}

    def hook(module, args, output):
        out = output.clone()
        out[:, -1, 2] += plan(calls["step"])
        calls["step"] += 1
        return out

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_tokenizer_left_pads(prompts, tokenizer, model):
    ids, attn = prompts
    assert ids.shape == (3, 8)
    assert attn[1].tolist() == [0, 0, 0, 0, 0, 1, 1, 1] and ids[1, 0].item() == tokenizer.pad_token_id
    assert resolve_special_ids(model, tokenizer) == ([2], 0)
    assert resolve_special_ids(model, eos_token_id=[2, 5]) == ([2, 5], 0)


def test_greedy_rollout_of_each_row_matches_the_unpadded_row_alone(model, prompts):
    """Left padding, position ids and the KV cache leave every row's tokens as if it were decoded alone."""
    ids, attn = prompts
    batch = sample_rollouts(model, ids, attn, max_new_tokens=6, do_sample=False)
    assert batch.prompt_input_ids is ids
    for i in range(ids.shape[0]):
        row = ids[i][attn[i].bool()][None]
        alone = sample_rollouts(model, row, torch.ones_like(row), max_new_tokens=6, do_sample=False)
        n = int(batch.completion_mask[i].sum())
        assert alone.completion_input_ids[0, :n].tolist() == batch.completion_input_ids[i, :n].tolist()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_greedy_rollout_matches_transformers_generate_without_warnings(model, prompts, tokenizer):
    ids, attn = prompts
    # transformers' logger does not propagate to the root logger, so listen on it directly.
    hf_logger, records = logging.getLogger("transformers"), _Records()
    hf_logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = sample_rollouts(model, ids, attn, max_new_tokens=6, do_sample=False, tokenizer=tokenizer)
        assert not caught and not records.messages
        with torch.no_grad():  # the listener hears transformers: generate without a mask, pad = EOS, warns
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=2, eos_token_id=2)
        assert records.messages
    finally:
        hf_logger.removeHandler(records)
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False,
                                pad_token_id=0, eos_token_id=2)[:, ids.shape[1]:]
    t = ours.completion_input_ids.shape[1]
    assert ours.completion_input_ids.tolist() == theirs[:, :t].tolist()


def test_sampling_with_warpers_matches_transformers_generate_under_one_seed(model, prompts):
    ids, attn = prompts
    kw = dict(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=8, top_p=0.9)
    torch.manual_seed(123)
    ours = sample_rollouts(model, ids, attn, eos_token_id=2, pad_token_id=0, **kw)
    torch.manual_seed(123)
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=attn, pad_token_id=0, eos_token_id=2, **kw)[:, ids.shape[1]:]
    t = ours.completion_input_ids.shape[1]
    assert ours.completion_input_ids.tolist() == theirs[:, :t].tolist()


def test_forced_eos_stops_generation(model, prompts):
    ids, attn = prompts
    with _eos_logits(model, lambda step: torch.full((3,), 1e4)):
        batch = sample_rollouts(model, ids, attn, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert batch.completion_input_ids.tolist() == [[2], [2], [2]]
    assert batch.completion_mask.all()
    assert not batch.extras["truncated"].any()


def test_eos_masking_per_row_and_truncation(model, prompts):
    """Row r is forced to emit EOS at step r (rows 0, 1); row 2 is never allowed to: it runs to max_new_tokens."""
    ids, attn = prompts

    def plan(step):
        bias = torch.full((3,), -1e4)
        if step < 2:
            bias[step] = 1e4
        return bias

    with _eos_logits(model, plan):
        batch = sample_rollouts(model, ids, attn, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert batch.completion_mask.tolist() == [[True, False, False, False], [True, True, False, False], [True] * 4]
    toks = batch.completion_input_ids
    assert toks[0].tolist() == [2, 0, 0, 0] and toks[1, 1].item() == 2 and toks[1, 2:].tolist() == [0, 0]
    assert 2 not in toks[2].tolist()
    assert batch.extras["truncated"].tolist() == [False, False, True]


def test_sampling_is_reproducible_under_a_generator(model, prompts):
    ids, attn = prompts

    def run(seed):
        return sample_rollouts(model, ids, attn, max_new_tokens=6, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.completion_input_ids, b.completion_input_ids)
    assert not torch.equal(a.completion_input_ids, c.completion_input_ids)


def test_num_samples_is_prompt_major(model, prompts):
    ids, attn = prompts
    batch = sample_rollouts(model, ids, attn, max_new_tokens=3, num_samples=2,
                            generator=torch.Generator().manual_seed(0))
    assert batch.num_rows == 6
    assert torch.equal(batch.prompt_input_ids, ids.repeat_interleave(2, dim=0))


def test_bad_prompts_are_rejected(model, prompts):
    ids, attn = prompts
    right = attn.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        sample_rollouts(model, ids, right, max_new_tokens=2)
    empty = attn.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"prompt rows \[1\]"):
        sample_rollouts(model, ids, empty, max_new_tokens=2)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert sample_next_token(logits, top_k=1, generator=g).tolist() == [1, 0]
        assert sample_next_token(logits, top_p=1e-3, generator=g).tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_rollout_matches_a_plain_forward_on_each_unpadded_row(model, ref_model, prompts, temperature):
    ids, attn = prompts

    def plan(step):  # rows end at different lengths so that chunks are trimmed differently
        bias = torch.full((3,), -1e4)
        bias[step % 3] = 1e4 if step in (1, 3) else -1e4
        return bias

    with _eos_logits(model, plan):
        batch = sample_rollouts(model, ids, attn, max_new_tokens=5, generator=torch.Generator().manual_seed(3))
    assert batch.completion_mask.sum(-1).tolist() == [4, 2, 5]
    out = score_rollout(model, batch, ref_model=ref_model, chunk_rows=2, temperature=temperature,
                        with_entropy=True, with_full_kl=True)
    mask = batch.completion_mask
    for key in ("token_logps", "ref_token_logps", "entropy", "full_kl"):
        assert out[key].shape == mask.shape and out[key].dtype == torch.float32
        assert (out[key][~mask] == 0).all()
    with torch.no_grad():
        for i in range(3):
            prompt = ids[i][attn[i].bool()]
            resp = batch.completion_input_ids[i][mask[i]]
            full = torch.cat([prompt, resp])[None]
            sl = slice(len(prompt) - 1, len(prompt) - 1 + len(resp))
            lp = torch.log_softmax(model(full).logits[0, sl].double() / temperature, -1)
            lr = torch.log_softmax(ref_model(full).logits[0, sl].double() / temperature, -1)
            n = len(resp)
            gather = lp.gather(-1, resp[:, None])[:, 0]
            torch.testing.assert_close(out["token_logps"][i, :n].double(), gather, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out["ref_token_logps"][i, :n].double(), lr.gather(-1, resp[:, None])[:, 0],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out["entropy"][i, :n].double(), -(lp.exp() * lp).sum(-1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out["full_kl"][i, :n].double(), (lp.exp() * (lp - lr)).sum(-1),
                                       atol=1e-5, rtol=1e-5)


def test_score_rollout_with_a_reference_context(model, prompts):
    """The LoRA path: the reference is the policy run inside a context (here one that changes nothing)."""
    ids, attn = prompts
    batch = sample_rollouts(model, ids, attn, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    entered = []

    @contextlib.contextmanager
    def ctx():
        entered.append(True)
        yield

    out = score_rollout(model, batch, ref_context=ctx, chunk_rows=2, with_full_kl=True)
    assert len(entered) == 2  # once per chunk
    torch.testing.assert_close(out["ref_token_logps"], out["token_logps"])
    torch.testing.assert_close(out["full_kl"], torch.zeros_like(out["full_kl"]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="with_full_kl"):
        score_rollout(model, batch, with_full_kl=True)


def test_score_rollout_of_a_hand_built_batch(model):
    """Works on any CompletionBatch, not only on sampled ones (e.g. re-scoring stored responses)."""
    batch = CompletionBatch(
        prompt_input_ids=torch.tensor([[0, 1, 5], [1, 6, 7]]),
        prompt_attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        completion_input_ids=torch.tensor([[8, 2, 0], [9, 10, 2]]),
        completion_mask=torch.tensor([[True, True, False], [True, True, True]]),
    )
    out = score_rollout(model, batch, chunk_rows=1)
    assert out.keys() == {"token_logps"}
    assert (out["token_logps"][batch.completion_mask] < 0).all()


# peft reads a transformers attribute that transformers 5 has deprecated; not ours to fix.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_lora_policy_with_the_adapter_disabled_as_reference(tokenizer, prompts):
    """DESIGN's LoRA path: sampling through the PEFT wrapper, reference = the same model with its adapter off."""
    peft = pytest.importorskip("peft")
    base = _llama(len(tokenizer), seed=0)
    plain = _llama(len(tokenizer), seed=0)
    policy = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False)).eval()
    ids, attn = prompts
    batch = sample_rollouts(policy, ids, attn, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    out = score_rollout(policy, batch, ref_context=policy.disable_adapter, with_full_kl=True)
    torch.testing.assert_close(out["ref_token_logps"], score_rollout(plain, batch)["token_logps"])
    mask = batch.completion_mask
    assert (out["full_kl"][mask] > 0).all()
    assert not torch.allclose(out["token_logps"][mask], out["ref_token_logps"][mask])


def test_sample_prompts_renders_left_pads_samples_and_decodes(model, tokenizer, prompts):
    ids, attn = prompts
    assert all(torch.equal(a, b) for a, b in zip(left_pad_prompts(model, tokenizer, PROMPTS), prompts))
    batch = sample_prompts(model, tokenizer, PROMPTS, max_new_tokens=6, num_samples=2,
                           generator=torch.Generator().manual_seed(3))
    alone = sample_rollouts(model, ids, attn, max_new_tokens=6, num_samples=2, tokenizer=tokenizer,
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(batch.completion_input_ids, alone.completion_input_ids)
    assert batch.responses == [tokenizer.decode(row[m], skip_special_tokens=True).strip()
                               for row, m in zip(alone.completion_input_ids, alone.completion_mask)]
