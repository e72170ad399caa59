"""T-REG against an independent loop implementation of its loss (docs/methods/treg.md) and its invariants."""

import math

import pytest
import torch

from finegrain.errors import ConfigError
from finegrain.losses import dpo_loss, simpo_loss, treg_loss
from finegrain.ops import masked_sum

B, TW, TL = 4, 7, 5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)

    def logps(t):
        return (-3.0 * torch.rand(B, t, generator=g, dtype=torch.float64)).requires_grad_(True)

    mask_w = torch.zeros(B, TW, dtype=torch.bool)
    mask_l = torch.zeros(B, TL, dtype=torch.bool)
    for b, (lw, ll) in enumerate([(7, 5), (1, 3), (4, 1), (6, 0)]):
        mask_w[b, :lw] = True
        mask_l[b, :ll] = True
    return dict(
        pi_w=logps(TW), ref_w=logps(TW).detach(), pi_l=logps(TL), ref_l=logps(TL).detach(),
        rhat_w=torch.rand(B, TW, generator=g, dtype=torch.float64) - 0.5,
        rhat_l=torch.rand(B, TL, generator=g, dtype=torch.float64) - 0.5,
        mask_w=mask_w, mask_l=mask_l,
    )


def _naive(inp, beta, alpha, base, gamma, reduction, weighting):
    """The loss of docs/methods/treg.md written per pair and per token with Python loops."""
    losses = []
    for b in range(B):
        def seq(key, mask, b=b):
            return sum(inp[key][b, t] for t in range(mask.shape[1]) if mask[b, t])

        n_w, n_l = int(inp["mask_w"][b].sum()), int(inp["mask_l"][b].sum())
        if base == "dpo":
            z_w = beta * (seq("pi_w", inp["mask_w"]) - seq("ref_w", inp["mask_w"]))
            z_l = beta * (seq("pi_l", inp["mask_l"]) - seq("ref_l", inp["mask_l"]))
            margin = z_w - z_l
        else:
            z_w = beta * seq("pi_w", inp["mask_w"]) / max(n_w, 1)
            z_l = beta * seq("pi_l", inp["mask_l"]) / max(n_l, 1)
            margin = z_w - z_l - gamma
        base_loss = -torch.log(torch.sigmoid(torch.as_tensor(margin)))
        w = 1.0 if weighting == "static" else 1.0 / (1.0 + math.exp(float(margin.detach())))
        reg_w = -beta * sum(inp["rhat_w"][b, t] * inp["pi_w"][b, t] for t in range(TW) if inp["mask_w"][b, t])
        reg_l = -beta * sum(inp["rhat_l"][b, t] * inp["pi_l"][b, t] for t in range(TL) if inp["mask_l"][b, t])
        if reduction == "mean":
            reg_w, reg_l = reg_w / max(n_w, 1), reg_l / max(n_l, 1)
        losses.append(base_loss + alpha * w * (reg_w + reg_l))
    return torch.stack(losses)


def _call(inp, **kw):
    return treg_loss(inp["pi_w"], inp["ref_w"], inp["pi_l"], inp["ref_l"], inp["rhat_w"], inp["rhat_l"],
                     inp["mask_w"], inp["mask_l"], **kw)


@pytest.mark.parametrize("base", ["dpo", "simpo"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("weighting", ["dpo_grad", "static"])
def test_matches_naive_values_and_gradients(base, reduction, weighting):
    inp = _inputs()
    kw = dict(beta=0.7, alpha=0.25, base=base, gamma=0.3 if base == "simpo" else 0.0)
    out = _call(inp, token_reduction=reduction, weighting=weighting, **kw)
    want = _naive(inp, reduction=reduction, weighting=weighting, **kw)
    torch.testing.assert_close(out.losses, want, atol=1e-12, rtol=0)
    got_g = torch.autograd.grad(out.losses.sum(), (inp["pi_w"], inp["pi_l"]))
    want_g = torch.autograd.grad(want.sum(), (inp["pi_w"], inp["pi_l"]))
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_default_reduction_follows_the_base():
    inp = _inputs(1)
    for base, natural in (("dpo", "sum"), ("simpo", "mean")):
        a = _call(inp, beta=1.0, alpha=0.5, base=base).losses
        b = _call(inp, beta=1.0, alpha=0.5, base=base, token_reduction=natural).losses
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("base", ["dpo", "simpo"])
def test_alpha_zero_or_zero_rewards_give_the_base_loss(base):
    inp = _inputs(2)
    beta, gamma = 0.5, 0.4
    chosen, rejected = masked_sum(inp["pi_w"], inp["mask_w"], -1), masked_sum(inp["pi_l"], inp["mask_l"], -1)
    if base == "dpo":
        want = dpo_loss(chosen, rejected, masked_sum(inp["ref_w"], inp["mask_w"], -1),
                        masked_sum(inp["ref_l"], inp["mask_l"], -1), beta).losses
    else:
        want = simpo_loss(chosen, rejected, inp["mask_w"].sum(-1), inp["mask_l"].sum(-1), beta, gamma).losses
    torch.testing.assert_close(_call(inp, beta=beta, alpha=0.0, base=base, gamma=gamma).losses, want,
                               atol=1e-12, rtol=0)
    zero = dict(inp, rhat_w=torch.zeros_like(inp["rhat_w"]), rhat_l=torch.zeros_like(inp["rhat_l"]))
    torch.testing.assert_close(_call(zero, beta=beta, alpha=0.5, base=base, gamma=gamma).losses, want,
                               atol=1e-12, rtol=0)


def test_weights_are_sigmoid_of_the_reversed_margin_and_carry_no_gradient():
    inp = _inputs(3)
    beta = 0.8
    out = _call(inp, beta=beta, alpha=0.5)
    z_w = beta * (masked_sum(inp["pi_w"], inp["mask_w"], -1) - masked_sum(inp["ref_w"], inp["mask_w"], -1))
    z_l = beta * (masked_sum(inp["pi_l"], inp["mask_l"], -1) - masked_sum(inp["ref_l"], inp["mask_l"], -1))
    torch.testing.assert_close(out.extras["weights"], torch.sigmoid(z_l - z_w).detach(), atol=1e-12, rtol=0)
    assert not out.extras["weights"].requires_grad
    assert not any(v.requires_grad for v in out.extras.values())
    assert not out.chosen_rewards.requires_grad
    torch.testing.assert_close(out.chosen_rewards, z_w.detach(), atol=1e-12, rtol=0)
    static = _call(inp, beta=beta, alpha=0.5, weighting="static")
    assert (static.extras["weights"] == 1).all()


def test_gradient_identity_dpo_sum():
    """docs/methods/treg.md: ∂L/∂ℓ^w_t = −βw(1 + α r̂^w_t) m_t and ∂L/∂ℓ^l_t = βw(1 − α r̂^l_t) m_t, w = σ(Z_l − Z_w)."""
    inp = _inputs(4)
    beta, alpha = 0.6, 0.5
    out = _call(inp, beta=beta, alpha=alpha)
    g_w, g_l = torch.autograd.grad(out.losses.sum(), (inp["pi_w"], inp["pi_l"]))
    w = out.extras["weights"][:, None]
    want_w = -beta * w * (1 + alpha * inp["rhat_w"]) * inp["mask_w"]
    want_l = beta * w * (1 - alpha * inp["rhat_l"]) * inp["mask_l"]
    torch.testing.assert_close(g_w, want_w, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_l, want_l, atol=1e-12, rtol=0)


def test_gradient_identity_simpo_mean():
    """SimPO-REG: the same identity with β replaced by β/|y| and w = σ(γ − (Z_w − Z_l))."""
    inp = _inputs(5)
    beta, alpha, gamma = 2.0, 0.25, 0.5
    out = _call(inp, beta=beta, alpha=alpha, base="simpo", gamma=gamma)
    g_w, g_l = torch.autograd.grad(out.losses.sum(), (inp["pi_w"], inp["pi_l"]))
    z_w, z_l = out.chosen_rewards, out.rejected_rewards
    torch.testing.assert_close(out.extras["weights"], torch.sigmoid(gamma - (z_w - z_l)), atol=1e-12, rtol=0)
    w = out.extras["weights"][:, None]
    n_w = inp["mask_w"].sum(-1, keepdim=True).clamp(min=1).double()
    n_l = inp["mask_l"].sum(-1, keepdim=True).clamp(min=1).double()
    torch.testing.assert_close(g_w, -beta / n_w * w * (1 + alpha * inp["rhat_w"]) * inp["mask_w"], atol=1e-12, rtol=0)
    torch.testing.assert_close(g_l, beta / n_l * w * (1 - alpha * inp["rhat_l"]) * inp["mask_l"], atol=1e-12, rtol=0)


@pytest.mark.parametrize("base", ["dpo", "simpo"])
def test_masked_positions_are_inert(base):
    inp = _inputs(6)
    clean = _call(inp, beta=0.5, alpha=0.5, base=base)
    clean_g = torch.autograd.grad(clean.losses.sum(), (inp["pi_w"], inp["pi_l"]))
    dirty = dict(inp)
    for key, mask in (("pi_w", "mask_w"), ("ref_w", "mask_w"), ("rhat_w", "mask_w"),
                      ("pi_l", "mask_l"), ("ref_l", "mask_l"), ("rhat_l", "mask_l")):
        x = inp[key].detach().clone()
        x[~inp[mask]] = float("nan")
        dirty[key] = x.requires_grad_(key.startswith("pi"))
    out = _call(dirty, beta=0.5, alpha=0.5, base=base)
    torch.testing.assert_close(out.losses, clean.losses, atol=0, rtol=0)
    for a, b in zip(torch.autograd.grad(out.losses.sum(), (dirty["pi_w"], dirty["pi_l"])), clean_g):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert torch.isfinite(a).all()


def test_token_rewards_never_receive_gradient():
    inp = _inputs(7)
    inp["rhat_w"].requires_grad_(True)
    inp["rhat_l"].requires_grad_(True)
    _call(inp, beta=0.5, alpha=0.5).losses.sum().backward()
    assert inp["rhat_w"].grad is None and inp["rhat_l"].grad is None
    assert inp["pi_w"].grad is not None


def test_simpo_base_needs_no_reference_and_dpo_base_does():
    inp = _inputs(8)
    out = _call(dict(inp, ref_w=None, ref_l=None), beta=2.0, alpha=0.5, base="simpo", gamma=0.5)
    assert torch.isfinite(out.losses).all()
    with pytest.raises(ConfigError, match="reference"):
        _call(dict(inp, ref_w=None, ref_l=None), beta=2.0, alpha=0.5)


@pytest.mark.parametrize("bad", [dict(base="ipo"), dict(token_reduction="max"), dict(weighting="dynamic")])
def test_unknown_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        _call(_inputs(), beta=0.1, alpha=0.1, **bad)


# ------------------------------------------------------------------------------------------------ diagnostic


def test_shared_token_rewards_by_hand_and_masked_tokens_inert():
    """Per-pair sums of r̂ and |r̂| over shared and differing tokens (docs/methods/treg.md), by hand."""
    from finegrain.losses.treg import shared_token_rewards

    nan = float("nan")
    rw = torch.tensor([[0.25, -0.5, 0.125, nan], [0.5, 0.5, nan, nan]], dtype=torch.float64)
    rl = torch.tensor([[0.25, 0.375, nan], [-0.25, nan, nan]], dtype=torch.float64)
    mw = torch.tensor([[True, True, True, False], [True, True, False, False]])
    ml = torch.tensor([[True, True, False], [True, False, False]])
    sw = torch.tensor([[True, False, True, True], [False, False, True, True]])  # shared flags on masked slots: inert
    sl = torch.tensor([[True, False, True], [False, True, True]])
    out = shared_token_rewards(rw, rl, sw, sl, mw, ml)
    want = {
        "sum/shared_reward": [0.25 + 0.125 + 0.25, 0.0],
        "sum/shared_abs_reward": [0.625, 0.0],
        "sum/shared_tokens": [3.0, 0.0],
        "sum/diff_reward": [-0.5 + 0.375, 0.5 + 0.5 - 0.25],
        "sum/diff_abs_reward": [0.875, 1.25],
        "sum/diff_tokens": [2.0, 3.0],
        "sum/tokens": [5.0, 3.0],
    }
    assert set(out) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(out[k], torch.tensor(v, dtype=torch.float64), atol=1e-12, rtol=0, msg=k)
