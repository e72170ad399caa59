"""finegrain's one LoRA merge (finegrain.models.build.merged_lora_state_dict), used by the training loop's final
model and by the reward-model saver, against peft's own ``merge_and_unload`` on tiny models: linear layers, rsLoRA,
``modules_to_save``, an embedding adapter, GPT-2's transposed ``Conv1D``, a state dict gathered elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch

from finegrain.models.build import (
    causal_lm_from_config,
    is_peft_model,
    merged_lora_state_dict,
    save_merged_lora,
    tiny_llama_config,
)


def _llama():
    return causal_lm_from_config(tiny_llama_config(40, hidden_size=16, num_layers=2, num_heads=2), seed=3)


def _gpt2():
    from transformers import GPT2Config

    return causal_lm_from_config(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1,
                                            eos_token_id=2), seed=3)


def _peft(model, seed: int = 0, **lora):
    """``model`` with a LoRA adapter whose every weight is random (B = 0 at initialisation would merge nothing)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return peft_model.eval()


CASES = {
    "llama all-linear": (_llama, {"target_modules": "all-linear"}),
    "llama rsLoRA + modules_to_save": (_llama, {"target_modules": ["q_proj", "v_proj", "down_proj"],
                                                "use_rslora": True, "modules_to_save": ["embed_tokens"]}),
    "llama embedding adapter": (_llama, {"target_modules": ["embed_tokens", "o_proj"]}),
    "gpt2 Conv1D (fan_in_fan_out)": (_gpt2, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equal_to_peft_merge_and_unload(case):
    make, lora = CASES[case]
    model = _peft(make(), **lora)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = merged_lora_state_dict(model)
    assert is_peft_model(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    theirs = copy.deepcopy(model).merge_and_unload().state_dict()
    unmerged = copy.deepcopy(model).unload().state_dict()  # the base weights, adapter dropped
    assert sorted(ours) == sorted(theirs)
    for key, want in theirs.items():
        assert ours[key].dtype == want.dtype, key
        torch.testing.assert_close(ours[key], want, atol=1e-6, rtol=1e-6, msg=key)
    assert any(not torch.equal(theirs[k], unmerged[k]) for k in theirs)  # the adapter was merged into something
    # a state dict gathered elsewhere (CPU copies) gives the same merge
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(ours[k], v) for k, v in merged_lora_state_dict(model, gathered).items())


def test_the_merged_weights_compute_what_the_adapter_does():
    model = _peft(_llama(), target_modules="all-linear")
    plain = _llama()
    plain.load_state_dict(merged_lora_state_dict(model))
    ids = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_dora_is_refused():
    model = _peft(_llama(), target_modules=["q_proj"], use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        merged_lora_state_dict(model)


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_like_peft_saves_its_merged_model(case, tmp_path):
    """The directory loads into the model peft's ``merge_and_unload().save_pretrained`` writes (weights, tying)."""
    from transformers import AutoModelForCausalLM

    make, lora = CASES[case]
    model = _peft(make(), **lora)
    save_merged_lora(model, tmp_path / "ours")
    assert is_peft_model(model)
    copy.deepcopy(model).merge_and_unload().save_pretrained(tmp_path / "peft")
    ours, theirs = (AutoModelForCausalLM.from_pretrained(tmp_path / d) for d in ("ours", "peft"))
    assert ours.config.tie_word_embeddings == theirs.config.tie_word_embeddings
    want = theirs.state_dict()
    assert sorted(ours.state_dict()) == sorted(want)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, want[key], atol=1e-6, rtol=1e-6, msg=key)
