import torch

from finegrain.losses import tdpo_loss
from finegrain.ops import masked_sum
from finegrain.rewards.contrastive import contrastive_token_rewards, implicit_token_rewards, squash_to_half


def _rand(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def test_contrastive_rewards_match_the_formula():
    """T-REG (docs/methods/treg.md): (σ(logp_plus − logp_minus) − ½) · mask."""
    plus, minus = _rand(3, 6, seed=1), _rand(3, 6, seed=2)
    mask = _rand(3, 6, seed=3) > 0
    got = contrastive_token_rewards(plus, minus, mask)
    want = (torch.sigmoid(plus - minus) - 0.5) * mask
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert (got.abs() < 0.5).all() and (got[~mask] == 0).all()


def test_contrastive_rewards_masked_positions_inert_and_no_gradient():
    plus, minus = _rand(2, 5, seed=4).requires_grad_(True), _rand(2, 5, seed=5)
    mask = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    clean = contrastive_token_rewards(plus, minus, mask)
    assert not clean.requires_grad
    dirty_plus = plus.detach().clone()
    dirty_plus[~mask] = float("nan")
    dirty_minus = minus.clone()
    dirty_minus[~mask] = float("inf")
    torch.testing.assert_close(contrastive_token_rewards(dirty_plus, dirty_minus, mask), clean, atol=0, rtol=0)


def test_squash_to_half():
    x = torch.tensor([-1e4, -3.0, -1e-9, 0.0, 1e-9, 3.0, 1e4], dtype=torch.float64)
    got = squash_to_half(x)
    torch.testing.assert_close(got, torch.sigmoid(x) - 0.5, atol=1e-15, rtol=0)
    assert got[3] == 0 and torch.equal(got, -squash_to_half(-x))
    assert (got.abs() <= 0.5).all()
    torch.testing.assert_close(got[4], torch.tensor(0.25e-9, dtype=torch.float64), atol=0, rtol=1e-12)  # slope ¼ at 0


def test_implicit_rewards_dpo_and_tdpo():
    """β ρ_t and β (ρ_t + K_t); for TDPO their sums are the rewards tdpo_loss logs (docs/methods/tdpo.md)."""
    b, t, beta = 2, 5, 0.3
    logps = _rand(2 * b, t, seed=6).requires_grad_(True)
    ref = _rand(2 * b, t, seed=7)
    kl = _rand(2 * b, t, seed=8).abs().requires_grad_(True)
    mask = _rand(2 * b, t, seed=9) > -0.5
    dpo = implicit_token_rewards(logps, ref, mask, beta)
    torch.testing.assert_close(dpo, beta * (logps - ref).detach() * mask, atol=1e-12, rtol=0)
    tdpo = implicit_token_rewards(logps, ref, mask, beta, token_kl=kl)
    torch.testing.assert_close(tdpo, beta * (logps - ref + kl).detach() * mask, atol=1e-12, rtol=0)
    assert not dpo.requires_grad and not tdpo.requires_grad

    margin = masked_sum(logps - ref, mask, dim=-1)
    seq_kl = masked_sum(kl, mask, dim=-1)
    out = tdpo_loss(margin[:b], margin[b:], seq_kl[:b], seq_kl[b:], beta)
    sums = tdpo.sum(-1)
    torch.testing.assert_close(sums[:b], out.chosen_rewards, atol=1e-12, rtol=0)
    torch.testing.assert_close(sums[b:], out.rejected_rewards, atol=1e-12, rtol=0)


def test_implicit_rewards_masked_positions_inert():
    logps, ref = _rand(1, 4, seed=10), _rand(1, 4, seed=11)
    mask = torch.tensor([[True, True, False, False]])
    clean = implicit_token_rewards(logps, ref, mask, 0.1)
    dirty = logps.clone()
    dirty[~mask] = float("nan")
    torch.testing.assert_close(implicit_token_rewards(dirty, ref, mask, 0.1), clean, atol=0, rtol=0)
