import math

import pytest
import torch

from finegrain.errors import ConfigError
from finegrain.losses import (
    PREFERENCE_LOSSES,
    PreferenceLossSpec,
    dpo_loss,
    get_preference_loss_spec,
    simpo_loss,
)


def _pairs(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(-20.0 * torch.rand(b, generator=g, dtype=torch.float64)).requires_grad_(True) for _ in range(4)]


def _naive_dpo(pw, pl, rw, rl, beta, eps):
    """Rafailov et al. eq. 7 with conservative label smoothing, written out with sigmoid and log."""
    u = beta * ((pw - rw) - (pl - rl))
    return -(1 - eps) * torch.log(torch.sigmoid(u)) - eps * torch.log(torch.sigmoid(-u))


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_matches_naive_values_and_gradients(beta, eps):
    pw, pl, rw, rl = _pairs()
    out = dpo_loss(pw, pl, rw.detach(), rl.detach(), beta, label_smoothing=eps)
    want = _naive_dpo(pw, pl, rw.detach(), rl.detach(), beta, eps)
    torch.testing.assert_close(out.losses, want, atol=1e-12, rtol=0)
    got_g = torch.autograd.grad(out.losses.sum(), (pw, pl))
    want_g = torch.autograd.grad(want.sum(), (pw, pl))
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, beta * (pw - rw).detach(), atol=0, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, beta * (pl - rl).detach(), atol=0, rtol=0)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_dpo_hand_values_and_stability():
    """u = 0 gives log 2; u = ±1000 gives 1000 and 0 (log σ via logsigmoid, no overflow to inf)."""
    z = torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(dpo_loss(z, z, z, z, 0.1).losses, torch.tensor([math.log(2)], dtype=torch.float64))
    big = torch.tensor([1000.0, -1000.0], dtype=torch.float64)
    out = dpo_loss(-big, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                   torch.zeros(2, dtype=torch.float64), 1.0)
    torch.testing.assert_close(out.losses, torch.tensor([1000.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        dpo_loss(z, z, z, z, 0.1, label_smoothing=0.5)


def test_simpo_matches_naive_values_and_gradients():
    """Meng et al. eq. 6: −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ)."""
    pw, pl, _, _ = _pairs(seed=1)
    lw = torch.tensor([3, 7, 1, 12, 5])
    ll = torch.tensor([4, 2, 9, 1, 6])
    beta, gamma = 2.5, 1.2
    out = simpo_loss(pw, pl, lw, ll, beta, gamma)
    want = -torch.log(torch.sigmoid(beta * pw / lw - beta * pl / ll - gamma))
    torch.testing.assert_close(out.losses, want, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(out.losses.sum(), (pw, pl)), torch.autograd.grad(want.sum(), (pw, pl))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, (beta * pw / lw).detach())
    assert not out.chosen_rewards.requires_grad


def test_simpo_empty_response_is_finite():
    zero = torch.zeros(1, dtype=torch.float64)
    out = simpo_loss(zero, zero, torch.tensor([0]), torch.tensor([0]), 2.0, 0.0)
    torch.testing.assert_close(out.losses, torch.tensor([math.log(2)], dtype=torch.float64))


def test_preference_loss_registry():
    assert PREFERENCE_LOSSES == ("dpo", "simpo", "tdpo1", "tdpo2", "treg-dpo", "treg-simpo")
    assert get_preference_loss_spec("dpo") == PreferenceLossSpec("dpo", True, False, False, False)
    assert get_preference_loss_spec("simpo") == PreferenceLossSpec("simpo", False, False, False, True)
    for name in ("tdpo1", "tdpo2"):
        spec = get_preference_loss_spec(name)
        assert spec.needs_reference and spec.needs_ref_distribution and not spec.needs_token_rewards
    assert get_preference_loss_spec("treg-dpo") == PreferenceLossSpec("treg-dpo", True, False, True, False)
    assert get_preference_loss_spec("treg-simpo") == PreferenceLossSpec("treg-simpo", False, False, True, True)
    with pytest.raises(ConfigError, match="tdpo2.*treg-simpo"):
        get_preference_loss_spec("ipo")


# ------------------------------------------------------------------------------------------------ DPO-SFT


def test_dpo_sft_matches_hand_values_and_gradients():
    """DPO-SFT (T-REG's ablation; docs/methods/treg.md): L = L_DPO + λ · (−log π(y_w) / |y_w|), by hand in float64."""
    from finegrain.losses.dpo import dpo_sft_loss

    pw = torch.tensor([-6.0, -3.0], dtype=torch.float64, requires_grad=True)
    pl = torch.tensor([-5.0, -4.0], dtype=torch.float64, requires_grad=True)
    rw, rl = torch.tensor([-5.0, -3.0], dtype=torch.float64), torch.tensor([-5.0, -2.0], dtype=torch.float64)
    lengths = torch.tensor([3, 0])  # an empty chosen response counts as length 1
    out = dpo_sft_loss(pw, pl, rw, rl, lengths, beta=0.5, sft_weight=2.0)
    # pair 0: u = 0.5·((−6+5) − (−5+5)) = −0.5; NLL = 6/3 = 2.  pair 1: u = 0.5·((0) − (−2)) = 1; NLL = 3/1 = 3
    want = [math.log1p(math.exp(0.5)) + 2.0 * 2.0, math.log1p(math.exp(-1.0)) + 2.0 * 3.0]
    torch.testing.assert_close(out.losses, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.extras["nll_loss"], torch.tensor([2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-0.5, 0.0], dtype=torch.float64))
    out.losses.sum().backward()
    # ∂/∂pw = −β σ(−u) − λ/|y_w|;  ∂/∂pl = β σ(−u)
    s = [1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(1.0))]
    torch.testing.assert_close(pw.grad, torch.tensor([-0.5 * s[0] - 2.0 / 3, -0.5 * s[1] - 2.0], dtype=torch.float64))
    torch.testing.assert_close(pl.grad, torch.tensor([0.5 * s[0], 0.5 * s[1]], dtype=torch.float64))


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_sft_with_zero_weight_is_dpo(eps):
    from finegrain.losses.dpo import dpo_sft_loss

    pw, pl, rw, rl = _pairs(seed=3)
    got = dpo_sft_loss(pw, pl, rw, rl, torch.tensor([4, 1, 7, 2, 9]), 0.1, 0.0, eps)
    want = dpo_loss(pw, pl, rw, rl, 0.1, eps)
    torch.testing.assert_close(got.losses, want.losses, atol=0, rtol=0)
    with pytest.raises(ValueError, match="sft_weight"):
        dpo_sft_loss(pw, pl, rw, rl, torch.tensor([1] * 5), 0.1, -1.0)
