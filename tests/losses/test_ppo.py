import math

import pytest
import torch

from finegrain.losses.ppo import aggregate, entropy_bonus, ppo_policy_loss, ppo_value_loss


def _policy_case():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 9.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 2.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    return old + ratios.log(), old, adv, mask


def test_policy_loss_hand_derived():
    """ε = 0.2, ratios r = (1.5, 0.5, 1.1), advantages A = (1, −1, 2), 4th token masked out.

    L_t = max(−A·r, −A·clip(r, 0.8, 1.2)):
      t1: max(−1.5, −1.2) = −1.2 (clipped);  t2: max(0.5, 0.8) = 0.8 (clipped);  t3: max(−2.2, −2.2) = −2.2.
    token mean = (−1.2 + 0.8 − 2.2)/3 = −0.8666…; clipfrac = 2/3.
    approx_kl = mean of k3 = r − 1 − log r: (0.5 − log 1.5, −0.5 + log 2, 0.1 − log 1.1)/3.
    Gradient w.r.t. the log-probs: 0 where clipped; −A·r/3 = −2.2/3 at t3; 0 on the masked token.
    """
    logps, old, adv, mask = _policy_case()
    logps.requires_grad_(True)
    out = ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(-2.6 / 3, abs=1e-12)
    assert out.clipfrac.item() == pytest.approx(2 / 3, abs=1e-12)
    kl = (0.5 - math.log(1.5) - 0.5 + math.log(2.0) + 0.1 - math.log(1.1)) / 3
    assert out.approx_kl.item() == pytest.approx(kl, abs=1e-12)
    assert not out.clipfrac.requires_grad and not out.approx_kl.requires_grad
    out.loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0, -2.2 / 3, 0.0]], dtype=torch.float64))


def test_policy_loss_sequence_reduction_hand_derived():
    """Two rows, ratio 1 (no clipping) so L_t = −A_t. Row 1: A = (1, 3) → mean −2; row 2: A = (6) → −6.
    "token": (−1 − 3 − 6)/3 = −10/3. "sequence": (−2 − 6)/2 = −4. A third, empty row is skipped."""
    adv = torch.tensor([[1.0, 3.0], [6.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    lp = torch.zeros(3, 2, dtype=torch.float64)
    assert ppo_policy_loss(lp, lp, adv, mask, reduction="token").loss.item() == pytest.approx(-10 / 3)
    assert ppo_policy_loss(lp, lp, adv, mask, reduction="sequence").loss.item() == pytest.approx(-4.0)
    assert ppo_policy_loss(lp, lp, adv, mask).clipfrac.item() == 0.0
    assert ppo_policy_loss(lp, lp, adv, mask).approx_kl.item() == 0.0


def test_policy_gradient_at_ratio_one_is_vanilla_policy_gradient():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 4, generator=g) > 0.3
    x = lp.clone().requires_grad_(True)
    ppo_policy_loss(x, lp, adv, mask).loss.backward()
    torch.testing.assert_close(x.grad, torch.where(mask, -adv / mask.sum(), 0.0))


def test_value_loss_hand_derived():
    """ε_v = 0.2, V = (1, 0, 2), V_old = (0, 0, 2.5), R = (2, 1, 1):
      t1: (1−2)² = 1 vs clipped V 0.2 → (0.2−2)² = 3.24 → 3.24 (clipped)
      t2: (0−1)² = 1 vs clipped V 0   → 1                → 1
      t3: (2−1)² = 1 vs clipped V 2.3 → (2.3−1)² = 1.69  → 1.69 (clipped)
    loss = ½·(3.24 + 1 + 1.69)/3 = 0.98833…; clipfrac = 2/3; unclipped loss = ½·3/3 = 0.5.
    Gradient at t2 only (the clipped terms do not depend on V): ½·2·(V−R)/3 = −1/3."""
    v = torch.tensor([[1.0, 0.0, 2.0, 50.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 2.5, -50.0]], dtype=torch.float64)
    ret = torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    out = ppo_value_loss(v, old, ret, mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(0.5 * 5.93 / 3, abs=1e-12)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    out.loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, -1 / 3, 0.0, 0.0]], dtype=torch.float64))
    plain = ppo_value_loss(v, old, ret, mask, clip_eps=None)
    assert plain.loss.item() == pytest.approx(0.5) and plain.clipfrac.item() == 0.0


def test_entropy_bonus_and_aggregate():
    ent = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert entropy_bonus(ent, mask).item() == pytest.approx(7 / 3)
    assert entropy_bonus(ent, mask, "sequence").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate(ent, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        aggregate(ent, mask, "batch")
