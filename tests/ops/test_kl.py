import math

import pytest
import torch

from finegrain.ops.kl import (
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    reverse_kl_from_logits,
    reverse_kl_from_logps,
)


def _logps(seed, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(shape, generator=g, dtype=torch.float64) * 4
    return lp, ref


def test_estimators_match_schulman_definitions():
    """With r = π_ref/π_θ at the sampled token: k1 = −log r, k2 = (log r)²/2, k3 = (r − 1) − log r."""
    lp, ref = _logps(0)
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            r = math.exp(ref[i, t].item() - lp[i, t].item())
            assert kl_k1(lp, ref)[i, t].item() == pytest.approx(-math.log(r), abs=1e-12)
            assert kl_k2(lp, ref)[i, t].item() == pytest.approx(0.5 * math.log(r) ** 2, abs=1e-12)
            assert kl_k3(lp, ref)[i, t].item() == pytest.approx((r - 1) - math.log(r), abs=1e-12)


def test_k1_and_k3_are_unbiased_over_the_policy_distribution():
    """E_{y~p}[k1] = E_{y~p}[k3] = KL(p ‖ q) exactly (the expectation of r − 1 is 0); k2 is not unbiased."""
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(4, 11, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(4, 11, generator=g, dtype=torch.float64), -1)
    exact = (logp.exp() * (logp - logq)).sum(-1)
    torch.testing.assert_close((logp.exp() * kl_k1(logp, logq)).sum(-1), exact, atol=1e-12, rtol=0)
    torch.testing.assert_close((logp.exp() * kl_k3(logp, logq)).sum(-1), exact, atol=1e-12, rtol=0)
    assert not torch.allclose((logp.exp() * kl_k2(logp, logq)).sum(-1), exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_k2_and_k3_are_non_negative(dtype):
    rho = torch.cat([torch.linspace(-20, 20, 401), torch.tensor([1e-8, -1e-8, 1e-30, 0.0, 3e-4, -3e-4])])
    zero = torch.zeros_like(rho)
    assert (kl_k3(rho.to(dtype), zero.to(dtype)) >= 0).all()
    assert (kl_k2(rho.to(dtype), zero.to(dtype)) >= 0).all()


def test_k3_keeps_precision_near_zero():
    """k3(ρ) = ρ²/2 − ρ³/6 + …; in float32 ``exp(−ρ) − 1 + ρ`` would return 0 for ρ = 1e-4."""
    rho = torch.tensor([1e-4, -1e-4], dtype=torch.float32)
    got = kl_k3(rho, torch.zeros_like(rho))
    torch.testing.assert_close(got, 0.5 * rho.double().square().float(), rtol=1e-3, atol=0)


def _naive_reverse_kl(policy_logits, ref_logits):
    z, zr = policy_logits.double(), ref_logits.double()
    out = torch.zeros(z.shape[:-1], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in z.shape[:-1]]):
        idx = tuple(idx.tolist())
        p = torch.softmax(z[idx], -1)
        total = 0.0
        for v in range(z.shape[-1]):
            total += p[v].item() * (math.log(p[v].item()) - torch.log_softmax(zr[idx], -1)[v].item())
        out[idx] = total
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_full_reverse_kl_matches_float64_sum_over_vocab(dtype, tol):
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(2, 3, 16, generator=g) * 2).to(dtype)
    zr = (torch.randn(2, 3, 16, generator=g) * 2).to(dtype)
    got = reverse_kl_from_logits(z, zr)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # bf16 logits are upcast before log_softmax: compare against the float64 KL of the same (rounded) logits.
    torch.testing.assert_close(got.double(), _naive_reverse_kl(z, zr), atol=tol, rtol=tol)
    assert (got >= -1e-6).all()


def test_full_reverse_kl_mask_and_banned_tokens():
    z = torch.tensor([[[0.0, 1.0, float("-inf")], [0.0, 0.0, 0.0]]])
    zr = torch.tensor([[[0.5, 0.0, 0.0], [float("nan"), 0.0, 0.0]]])
    got = reverse_kl_from_logits(z, zr, mask=torch.tensor([[True, False]]))
    p = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), -1)
    q = torch.log_softmax(torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64), -1)
    want = (p * (p.log() - q[:2])).sum()
    assert got[0, 0].item() == pytest.approx(want.item(), abs=1e-6)
    assert got[0, 1].item() == 0.0  # masked: the NaN reference row is ignored


def test_full_reverse_kl_gradient_is_finite_and_matches_autograd_of_naive():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 2, 7, generator=g, dtype=torch.float64, requires_grad=True)
    zr = torch.randn(1, 2, 7, generator=g, dtype=torch.float64)
    reverse_kl_from_logits(z, zr).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    lp = torch.log_softmax(z2, -1)
    (lp.exp() * (lp - torch.log_softmax(zr, -1))).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad, atol=1e-12, rtol=0)


def test_reverse_kl_from_logps_is_zero_for_identical_distributions():
    lp = torch.log_softmax(torch.randn(4, 9), -1)
    torch.testing.assert_close(reverse_kl_from_logps(lp, lp), torch.zeros(4))


def test_kl_penalty_dispatch_and_mask():
    lp, ref = _logps(4)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        got = kl_penalty(lp, ref, name, mask=mask)
        torch.testing.assert_close(got, torch.where(mask, fn(lp, ref), torch.zeros_like(lp)))
    z = torch.randn(3, 5, 6, dtype=torch.float64)
    zr = torch.randn(3, 5, 6, dtype=torch.float64)
    full = kl_penalty(None, None, "full", mask=mask, policy_logits=z, ref_logits=zr)
    torch.testing.assert_close(full, reverse_kl_from_logits(z, zr, mask))
    pre = torch.rand(3, 5)
    torch.testing.assert_close(kl_penalty(lp, ref, "full", mask=mask, full_kl=pre), torch.where(mask, pre, 0.0))


def test_kl_penalty_log_ratio_clip():
    lp, ref = torch.tensor([[-200.0, -1.0]]), torch.tensor([[-1.0, -1.0]])
    assert not torch.isfinite(kl_penalty(lp, ref, "k3")).all()
    clipped = kl_penalty(lp, ref, "k3", log_ratio_clip=10.0)
    assert clipped[0, 0].item() == pytest.approx(math.exp(10) - 1 - 10, rel=1e-6)
    assert kl_penalty(lp, ref, "k1", log_ratio_clip=10.0)[0, 0].item() == -10.0


def test_kl_penalty_errors():
    lp, ref = _logps(5)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, "k4")
    with pytest.raises(ValueError, match="needs full_kl"):
        kl_penalty(lp, ref, "full")
    with pytest.raises(ValueError, match="differ"):
        kl_penalty(lp, ref[:, :2], "k1")
