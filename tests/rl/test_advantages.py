import pytest
import torch

from finegrain.rl.advantages import (
    discounted_returns,
    gae_advantages,
    reinforce_advantages,
    rloo_advantages,
    whiten_advantages,
)


def _naive_gae(rewards, values, mask, gamma, lam):
    """One row at a time: keep the valid actions, run textbook GAE with V = 0 after the end, scatter back."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[i, t]]
        r = [rewards[i, t].item() for t in idx]
        v = [values[i, t].item() for t in idx] + [0.0]
        running = 0.0
        out = [0.0] * len(idx)
        for k in reversed(range(len(idx))):
            delta = r[k] + gamma * v[k + 1] - v[k]
            running = delta + gamma * lam * running
            out[k] = running
        for k, t in enumerate(idx):
            adv[i, t] = out[k]
    return adv


def _naive_rtg(rewards, mask, gamma):
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[i, t]]
        running = 0.0
        for t in reversed(idx):
            running = rewards[i, t].item() + gamma * running
            out[i, t] = running
    return out


def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(5, 7, generator=g, dtype=dtype)
    values = torch.randn(5, 7, generator=g, dtype=dtype)
    lengths = torch.tensor([7, 4, 1, 0, 5])
    mask = torch.arange(7)[None] < lengths[:, None]
    mask[4, 2] = False  # a hole: must be skipped as if absent
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_naive_loop(gamma, lam):
    rewards, values, mask = _batch()
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    want = _naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, torch.where(mask, want + values, 0.0), atol=1e-12, rtol=0)


def test_gae_float32_matches_float64():
    rewards, values, mask = _batch(1)
    adv32, _ = gae_advantages(rewards.float(), values.float(), mask, gamma=0.99, lam=0.95)
    adv64, _ = gae_advantages(rewards, values, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv32.double(), adv64, atol=1e-5, rtol=1e-5)


def test_gamma_lambda_one_is_return_to_go_minus_values():
    rewards, values, mask = _batch(2)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    rtg = _naive_rtg(rewards, mask, 1.0)
    torch.testing.assert_close(adv, torch.where(mask, rtg - values, 0.0), atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, rtg, atol=1e-12, rtol=0)


def test_masked_positions_are_inert():
    rewards, values, mask = _batch(3)
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.9)
    junk_r = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    junk_v = torch.where(mask, values, torch.full_like(values, float("nan")))
    adv2, ret2 = gae_advantages(junk_r, junk_v, mask, gamma=0.9, lam=0.9)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    assert (adv[3] == 0).all()  # an empty row


def test_hand_derived_gae():
    """R = (0, 0, 1), V = (0.5, 0.6, 0.7), γ = 1, λ = 0.5, bootstrap 0 after the last action:
    δ = (0 + 0.6 − 0.5, 0 + 0.7 − 0.6, 1 + 0 − 0.7) = (0.1, 0.1, 0.3);
    A_3 = 0.3, A_2 = 0.1 + 0.5·0.3 = 0.25, A_1 = 0.1 + 0.5·0.25 = 0.225; returns = A + V = (0.725, 0.85, 1.0)."""
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.6, 0.7, 0.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, True, False]])
    adv, ret = gae_advantages(r, v, m, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("gamma", [1.0, 0.7])
def test_discounted_returns_match_naive(gamma):
    rewards, _, mask = _batch(4)
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma), _naive_rtg(rewards, mask, gamma),
                               atol=1e-12, rtol=0)


def test_reinforce_normalises_returns_over_the_batch():
    rewards, _, mask = _batch(5)
    adv, ret = reinforce_advantages(rewards, mask)
    rtg = _naive_rtg(rewards, mask, 1.0)
    torch.testing.assert_close(ret, rtg, atol=1e-12, rtol=0)
    sel = rtg[mask]
    torch.testing.assert_close(adv[mask], (sel - sel.mean()) / sel.std(), atol=1e-6, rtol=1e-6)
    assert (adv[~mask] == 0).all()
    adv_raw, _ = reinforce_advantages(rewards, mask, normalize=False)
    torch.testing.assert_close(adv_raw, rtg, atol=1e-12, rtol=0)


def test_whiten_advantages_keeps_mean_when_asked():
    rewards, _, mask = _batch(6)
    w = whiten_advantages(rewards, mask, shift_mean=False)
    assert w[mask].mean().item() == pytest.approx(rewards[mask].mean().item(), abs=1e-9)
    assert w[mask].std().item() == pytest.approx(1.0, abs=1e-6)


def test_rloo_matches_leave_one_out_loop():
    g = torch.Generator().manual_seed(7)
    k = 3
    seq = torch.randn(4 * k, generator=g, dtype=torch.float64)
    want = torch.zeros_like(seq)
    for i in range(len(seq)):
        group = range((i // k) * k, (i // k + 1) * k)
        others = [seq[j].item() for j in group if j != i]
        want[i] = seq[i] - sum(others) / len(others)
    got = rloo_advantages(seq, k)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got.view(-1, k).sum(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    mask = torch.ones(4 * k, 5, dtype=torch.bool)
    mask[0, 2:] = False
    tok = rloo_advantages(seq, k, response_mask=mask)
    assert tok.shape == (4 * k, 5)
    torch.testing.assert_close(tok[0], torch.tensor([want[0], want[0], 0, 0, 0], dtype=torch.float64))


def test_rloo_rejects_bad_groups():
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple"):
        rloo_advantages(torch.zeros(5), 2)
