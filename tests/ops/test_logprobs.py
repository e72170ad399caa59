import pytest
import torch
import torch.nn.functional as F

from finegrain.ops.logprobs import selective_log_softmax, sequence_logps, token_entropy, token_logps


def _logits(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 11), (3, 5, 11)])
def test_selective_log_softmax_matches_full_log_softmax(dtype, shape):
    logits = _logits(shape, dtype).requires_grad_(True)
    index = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(1))
    got = selective_log_softmax(logits, index)
    want = F.log_softmax(logits.double(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    assert got.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)

    (g_got,) = torch.autograd.grad(got.sum(), logits)
    ref = logits.detach().double().requires_grad_(True)
    (g_want,) = torch.autograd.grad(F.log_softmax(ref, -1).gather(-1, index.unsqueeze(-1)).sum(), ref)
    torch.testing.assert_close(g_got.double(), g_want, atol=tol, rtol=tol)


def test_selective_log_softmax_rejects_a_mismatched_index():
    with pytest.raises(ValueError, match="shape of logits"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_token_logps_zero_and_inert_at_masked_positions():
    """No label shift: logits[:, t] scores labels[:, t]; -100 labels at masked positions are fine."""
    logits = _logits((2, 4, 9), torch.float64)
    labels = torch.tensor([[3, 1, -100, -100], [8, -100, -100, -100]])
    mask = labels != -100
    got = token_logps(logits, labels, mask)
    logp = F.log_softmax(logits, -1)
    for n in range(2):
        for t in range(4):
            want = logp[n, t, labels[n, t]] if mask[n, t] else torch.tensor(0.0, dtype=torch.float64)
            torch.testing.assert_close(got[n, t], want, atol=1e-12, rtol=0)
    garbage = logits.clone()
    garbage[~mask] = float("nan")
    torch.testing.assert_close(token_logps(garbage, labels, mask), got, atol=0, rtol=0)


def test_sequence_logps_sum_and_mean_with_an_empty_row():
    values = torch.tensor([[-1.0, -2.0, float("nan")], [-4.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(sequence_logps(values, mask), torch.tensor([-3.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(sequence_logps(values, mask, average=True), torch.tensor([-1.5, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_entropy_matches_naive(chunk_size, dtype):
    logits = _logits((3, 5, 13), dtype).requires_grad_(True)
    got = token_entropy(logits, chunk_size=chunk_size)
    ref = logits.detach().double().requires_grad_(True)
    want = -(F.softmax(ref, -1) * F.log_softmax(ref, -1)).sum(-1)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    assert got.shape == (3, 5)
    torch.testing.assert_close(got.double(), want.detach(), atol=tol, rtol=tol)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_want,) = torch.autograd.grad(want.sum(), ref)
    torch.testing.assert_close(g_got.double(), g_want, atol=tol, rtol=tol)


def test_token_entropy_with_banned_tokens_is_finite():
    """A -inf logit has p = 0 and contributes 0 (the limit of p log p), to the value and to the gradient."""
    logits = torch.tensor([[0.0, float("-inf"), 0.0, 0.0]], requires_grad=True)
    h = token_entropy(logits)
    torch.testing.assert_close(h, torch.log(torch.tensor([3.0])))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert not torch.isfinite(-(F.softmax(logits, -1) * F.softmax(logits, -1).log()).sum(-1)).all()
