"""ImplicitRewardSource: β ρ_t (DPO) and β (ρ_t + K_t) (TDPO) against plain full-logit forwards, row by row."""

import pytest
import torch

from finegrain.data.collate import collate_completions
from finegrain.models.build import causal_lm_from_config, tiny_llama_config
from finegrain.rewards.base import RewardSource
from finegrain.rewards.implicit import ImplicitRewardSource

V = 40


def _model(seed):
    return causal_lm_from_config(tiny_llama_config(V, hidden_size=32, num_layers=2, num_heads=2), seed=seed).eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    examples = []
    for p, t in ((3, 5), (1, 2), (4, 7)):
        examples.append({"prompt_input_ids": [1] + torch.randint(3, V, (p,), generator=g).tolist(),
                         "completion_input_ids": torch.randint(3, V, (t,), generator=g).tolist() + [2]})
    return examples, collate_completions(examples, pad_token_id=0)


def _naive(model, prompt, response):
    """Full-vocabulary log-probs of the states predicting each response token, from the unpadded row."""
    x = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].double()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(response)], dim=-1)


@pytest.mark.parametrize("kind", ["dpo", "tdpo"])
def test_implicit_rewards_match_plain_forwards(kind):
    policy, ref = _model(0), _model(1)
    examples, batch = _batch()
    source = ImplicitRewardSource(policy, 0.3, ref_model=ref, kind=kind, chunk_size=4)
    assert isinstance(source, RewardSource)
    got = source.token_rewards(batch)
    for i, ex in enumerate(examples):
        y = ex["completion_input_ids"]
        lp, lq = _naive(policy, ex["prompt_input_ids"], y), _naive(ref, ex["prompt_input_ids"], y)
        rho = lp[torch.arange(len(y)), y] - lq[torch.arange(len(y)), y]
        want = 0.3 * rho
        if kind == "tdpo":
            want = want + 0.3 * (lq.exp() * (lq - lp)).sum(-1)  # K_t = KL(π_ref ‖ π_θ)
        torch.testing.assert_close(got.values[i, : len(y)].double(), want, atol=1e-5, rtol=1e-5)
        assert (got.values[i, len(y):] == 0).all()
        torch.testing.assert_close(got.seq_reward[i].double(), want.sum(), atol=1e-5, rtol=1e-5)
    assert not got.values.requires_grad and torch.equal(got.mask, batch.completion_mask)


def test_lora_policy_against_its_disabled_adapter():
    """A LoRA policy scored against itself with the adapter off equals scoring against a frozen base copy."""
    import copy

    from finegrain.models.build import apply_lora

    base = _model(0)
    frozen = copy.deepcopy(base)
    policy = apply_lora(base, 4, 8, 0.0, ["all-linear"]).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    _, batch = _batch()
    lora = ImplicitRewardSource(policy, 0.1, ref_context=policy.disable_adapter, kind="tdpo").token_rewards(batch)
    copy_ref = ImplicitRewardSource(policy, 0.1, ref_model=frozen, kind="tdpo").token_rewards(batch)
    torch.testing.assert_close(lora.values, copy_ref.values, atol=1e-5, rtol=1e-5)
    assert lora.values[batch.completion_mask].abs().max() > 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        ImplicitRewardSource(_model(0), 0.1, ref_model=_model(1), kind="ppo")
    with pytest.raises(ValueError, match="ref_model"):
        ImplicitRewardSource(_model(0), 0.1)
    with pytest.raises(ValueError, match="beta"):
        ImplicitRewardSource(_model(0), 0.0, ref_model=_model(1))
