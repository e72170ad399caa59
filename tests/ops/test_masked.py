import pytest
import torch

from finegrain.ops import masked_mean, masked_sum, masked_var, masked_whiten


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_masked_reductions_match_naive(dtype):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 7, generator=g) > 0.4
    mask[2] = False  # an empty row
    v = values.to(dtype)
    tol = dict(atol=1e-12, rtol=0) if dtype == torch.float64 else dict(atol=3e-2, rtol=3e-2)
    for i in range(4):
        sel = values[i][mask[i]]
        want_sum = sel.sum() if len(sel) else torch.tensor(0.0, dtype=torch.float64)
        want_mean = sel.mean() if len(sel) else torch.tensor(0.0, dtype=torch.float64)
        torch.testing.assert_close(masked_sum(v, mask, dim=-1)[i].double(), want_sum, **tol)
        torch.testing.assert_close(masked_mean(v, mask, dim=-1)[i].double(), want_mean, **tol)
    flat = values[mask]
    torch.testing.assert_close(masked_var(v, mask).double(), flat.var(), **tol)
    torch.testing.assert_close(masked_var(v, mask, unbiased=False).double(), flat.var(unbiased=False), **tol)
    want_white = (flat - flat.mean()) / torch.sqrt(flat.var() + 1e-8)
    torch.testing.assert_close(masked_whiten(v, mask)[mask].double(), want_white, **tol)
    assert (masked_whiten(v, mask)[~mask] == 0).all()


def test_masked_positions_are_inert_even_when_nonfinite():
    values = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 2.0, 2.0]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    assert torch.equal(masked_sum(values, mask, dim=-1), torch.tensor([4.0, 4.0]))
    assert torch.equal(masked_mean(values, mask, dim=-1), torch.tensor([2.0, 2.0]))
    assert torch.isfinite(masked_whiten(values, mask)).all()


def test_empty_mask_gives_zero_not_nan():
    values = torch.randn(3, 5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    assert masked_mean(values, mask) == 0
    assert masked_var(values, mask) == 0
    assert (masked_whiten(values, mask) == 0).all()
