"""Bradley–Terry loss against hand-derived values."""

import math

import pytest
import torch

from finegrain.errors import DataError
from finegrain.losses.bt import bradley_terry_loss


def test_hand_values():
    """r_w = 2, r_l = 0.5, margin 0.5: logit 1, loss log(1 + e^-1) = 0.31326168751822286.

    Second pair: r_w = r_l = 0 -> log 2, and a tie counts as wrong.
    """
    out = bradley_terry_loss(torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([0.5, 0.0], dtype=torch.float64),
                             margin=torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert out.losses.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log(2)], abs=1e-15)
    assert out.accuracies.tolist() == [1.0, 0.0]
    assert out.margins.tolist() == [1.5, 0.0]


def test_centering_l2_and_scale():
    """r_w = 1, r_l = -3: plain loss log(1 + e^-4); centering c (r_w + r_l)^2 = 4c; SRM penalty λ (1 + 9) = 10λ;
    with logit scale ½ the logit is 2."""
    w, lo = torch.tensor([1.0], dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)
    base = math.log1p(math.exp(-4))
    assert bradley_terry_loss(w, lo).losses.item() == pytest.approx(base, abs=1e-15)
    assert bradley_terry_loss(w, lo, center_coef=0.1).losses.item() == pytest.approx(base + 0.4, abs=1e-15)
    assert bradley_terry_loss(w, lo, l2_coef=0.01).losses.item() == pytest.approx(base + 0.1, abs=1e-15)
    assert bradley_terry_loss(w, lo, logit_scale=torch.tensor([0.5], dtype=torch.float64)).losses.item() == pytest.approx(
        math.log1p(math.exp(-2)), abs=1e-15
    )


def test_stable_for_large_gaps_and_gradient():
    w = torch.tensor([0.0, 1000.0], requires_grad=True)
    lo = torch.tensor([1000.0, 0.0])
    out = bradley_terry_loss(w, lo)
    assert out.losses.tolist() == [1000.0, 0.0]
    out.losses.sum().backward()
    # d/dr_w [-log σ(r_w - r_l)] = -σ(r_l - r_w)
    assert w.grad.tolist() == [-1.0, 0.0]


def test_shape_errors():
    with pytest.raises(DataError):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(DataError):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3))
