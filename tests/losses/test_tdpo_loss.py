"""TDPO against a straightforward re-implementation of the authors' two functions (``_tdpo_get_batch_logps`` and
``tdpo_loss`` of their ``trainers.py``; docs/methods/tdpo.md).

The oracle below mirrors ``_tdpo_get_batch_logps`` and ``tdpo_loss`` of the TDPO reference code in the
*sequence* layout (``logits[:, :-1]`` scores ``labels[:, 1:]``, reference via ``softmax().log()``). finegrain's path
goes through the response layout instead: the predicting rows ``logits[:, :-1]`` are fed to
``completion_stats`` as hidden states with an identity head (so the "hidden" gradient *is* the gradient w.r.t. the
policy logits), then masked sums and ``tdpo_loss``.
"""

import pytest
import torch

from finegrain.errors import ConfigError
from finegrain.losses import tdpo_loss
from finegrain.ops import masked_sum
from finegrain.ops.chunked import completion_stats

B, L, V = 3, 16, 64  # B pairs -> 2B rows, chosen first


def _official_batch_logps(logits, reference_logits, labels):
    labels = labels[:, 1:].clone()
    logits, reference_logits = logits[:, :-1], reference_logits[:, :-1]
    loss_mask = labels != -100
    labels[labels == -100] = 0
    vocab_logps = logits.log_softmax(-1)
    with torch.no_grad():
        reference_vocab_ps = reference_logits.softmax(-1)
        reference_vocab_logps = reference_vocab_ps.log()
    per_position_kl = (reference_vocab_ps * (reference_vocab_logps - vocab_logps)).sum(-1)
    per_token_logps = vocab_logps.gather(-1, labels.unsqueeze(2)).squeeze(2)
    per_reference_token_logps = reference_vocab_logps.gather(-1, labels.unsqueeze(2)).squeeze(2)
    logps_margin = per_token_logps - per_reference_token_logps
    return (
        (logps_margin * loss_mask).sum(-1),
        (per_position_kl * loss_mask).sum(-1),
        (per_token_logps * loss_mask).sum(-1),
    )


def _official_tdpo_loss(cm, rm, ckl, rkl, beta, alpha, if_tdpo2):
    values = cm - rm
    if not if_tdpo2:
        logits = values - (rkl - ckl)
    else:
        logits = values - alpha * (rkl - ckl.detach())
    losses = -torch.log(torch.sigmoid(beta * logits))
    return losses, beta * (cm + ckl).detach(), beta * (rm + rkl).detach()


def _recipe(dtype, seed=0):
    """Logits randn·2 (small gaps, away from the official code's NaN); labels with a 4–6 token prompt of -100 and
    a random -100 tail; one row has a single response token."""
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(2 * B, L, V, generator=g, dtype=torch.float64)).to(dtype)
    ref_logits = (2.0 * torch.randn(2 * B, L, V, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (2 * B, L), generator=g)
    for n in range(2 * B):
        prompt = int(torch.randint(4, 7, (1,), generator=g))
        end = prompt + 1 if n == 1 else int(torch.randint(prompt + 1, L + 1, (1,), generator=g))
        labels[n, :prompt] = -100
        labels[n, end:] = -100
    return logits.requires_grad_(True), ref_logits, labels


def _ours(logits, ref_logits, labels, chunk_size=5):
    y = labels[:, 1:]
    mask = y != -100
    eye = torch.eye(V, dtype=logits.dtype)
    stats = completion_stats(logits[:, :-1], eye, y, mask, ref_hidden=ref_logits[:, :-1], compute_kl=True,
                             chunk_size=chunk_size)
    return (
        masked_sum(stats.token_logps - stats.ref_token_logps, mask, dim=-1),
        masked_sum(stats.token_kl, mask, dim=-1),
        masked_sum(stats.token_logps, mask, dim=-1),
    )


TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_the_reference_formulas(dtype, variant, alpha, beta):
    logits, ref_logits, labels = _recipe(dtype)
    tol = TOL[dtype]

    want_stats = _official_batch_logps(logits, ref_logits, labels)
    got_stats = _ours(logits, ref_logits, labels)
    for a, b in zip(got_stats, want_stats):
        torch.testing.assert_close(a, b, **tol)

    margin, kl, _ = got_stats
    out = tdpo_loss(margin[:B], margin[B:], kl[:B], kl[B:], beta, alpha=alpha, variant=variant)
    w_margin, w_kl, _ = want_stats
    w_losses, w_cr, w_rr = _official_tdpo_loss(w_margin[:B], w_margin[B:], w_kl[:B], w_kl[B:], beta, alpha,
                                               variant == "tdpo2")
    torch.testing.assert_close(out.losses, w_losses, **tol)
    torch.testing.assert_close(out.chosen_rewards, w_cr, **tol)
    torch.testing.assert_close(out.rejected_rewards, w_rr, **tol)
    assert not out.chosen_rewards.requires_grad

    (g_got,) = torch.autograd.grad(out.losses.mean(), logits)
    (g_want,) = torch.autograd.grad(w_losses.mean(), logits)
    torch.testing.assert_close(g_got, g_want, **tol)


def test_extras_are_unscaled_detached_kls():
    cm, rm, ckl, rkl = (torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (1.0, -0.5, 0.3, 0.7))
    out = tdpo_loss(cm, rm, ckl, rkl, beta=0.1)
    torch.testing.assert_close(out.extras["kl/chosen"], torch.tensor([0.3], dtype=torch.float64))
    torch.testing.assert_close(out.extras["kl/rejected"], torch.tensor([0.7], dtype=torch.float64))
    torch.testing.assert_close(out.extras["kl/margin"], torch.tensor([-0.4], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.13], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([0.02], dtype=torch.float64))
    assert not any(v.requires_grad for v in out.extras.values())


def _leaves(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, generator=g, dtype=torch.float64).abs().requires_grad_(True) for _ in range(4)]


def test_tdpo2_carries_no_gradient_through_the_chosen_kl():
    cm, rm, ckl, rkl = _leaves()
    out = tdpo_loss(cm, rm, ckl, rkl, beta=0.5, alpha=0.5, variant="tdpo2")
    grads = torch.autograd.grad(out.losses.sum(), (cm, rm, ckl, rkl), allow_unused=True, materialize_grads=True)
    assert (grads[2] == 0).all()
    assert (grads[3] != 0).all() and (grads[0] != 0).all()
    tdpo1 = tdpo_loss(cm, rm, ckl, rkl, beta=0.5, variant="tdpo1")
    assert (torch.autograd.grad(tdpo1.losses.sum(), ckl)[0] != 0).all()


def test_tdpo1_ignores_alpha():
    cm, rm, ckl, rkl = _leaves(2)
    a = tdpo_loss(cm, rm, ckl, rkl, beta=0.3, alpha=0.1, variant="tdpo1")
    b = tdpo_loss(cm, rm, ckl, rkl, beta=0.3, alpha=0.9, variant="tdpo1")
    torch.testing.assert_close(a.losses, b.losses, atol=0, rtol=0)
    for x, y in zip(torch.autograd.grad(a.losses.sum(), (cm, rm, ckl, rkl)),
                    torch.autograd.grad(b.losses.sum(), (cm, rm, ckl, rkl))):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_alpha_one_gives_equal_values_but_different_gradients():
    cm, rm, ckl, rkl = _leaves(3)
    one = tdpo_loss(cm, rm, ckl, rkl, beta=0.3, alpha=1.0, variant="tdpo1")
    two = tdpo_loss(cm, rm, ckl, rkl, beta=0.3, alpha=1.0, variant="tdpo2")
    torch.testing.assert_close(one.losses, two.losses, atol=1e-15, rtol=0)
    g1 = torch.autograd.grad(one.losses.sum(), ckl)[0]
    g2 = torch.autograd.grad(two.losses.sum(), ckl, allow_unused=True, materialize_grads=True)[0]
    assert not torch.equal(g1, g2)


def test_masked_positions_do_not_change_the_loss():
    logits, ref_logits, labels = _recipe(torch.float64, seed=4)
    clean = _ours(logits, ref_logits, labels)
    dirty_logits = logits.detach().clone()
    dirty_ref = ref_logits.clone()
    ignored = torch.cat([labels[:, 1:] == -100, torch.ones(2 * B, 1, dtype=torch.bool)], dim=1)
    dirty_logits[ignored] = float("nan")
    dirty_ref[ignored] = float("nan")
    dirty = _ours(dirty_logits.requires_grad_(True), dirty_ref, labels)
    for a, b in zip(dirty, clean):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_unknown_variant_is_a_config_error():
    x = torch.zeros(1)
    with pytest.raises(ConfigError, match="tdpo1, tdpo2"):
        tdpo_loss(x, x, x, x, 0.1, variant="tdpo3")


def test_official_quirk_is_avoided_on_underflow():
    """With a reference logit gap > 100 in float32 the official softmax().log() path gives NaN; ours does not."""
    logits, ref_logits, labels = _recipe(torch.float32, seed=5)
    ref_logits = ref_logits.clone()
    t = int((labels[0, 1:] != -100).nonzero()[0])  # a response position of row 0
    ref_logits[0, t, 0] = 150.0
    assert torch.isnan(_official_batch_logps(logits, ref_logits, labels)[1]).any()
    margin, kl, _ = _ours(logits, ref_logits, labels)
    assert torch.isfinite(kl).all() and torch.isfinite(margin).all()
    out = tdpo_loss(margin[:B], margin[B:], kl[:B], kl[B:], 0.1)
    (grad,) = torch.autograd.grad(out.losses.mean(), logits)
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()
