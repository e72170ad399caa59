"""TLCR reward modes (the paper's continuous reward and its discrete baselines), the end-of-response token and the
minimal-edit objective's edit weight, against a literal transcription of the official reward code and by hand.

The reference :func:`official_forward_value` follows the official TLCR code's ``forward_value`` (docs/methods/tlcr.md,
"Reward modes") statement by statement, one response at a time, in float64: ``p = softmax(z)``, ``q = softmax(p)``
on the response positions before the first EOS, its dead zone ``0.4 < max q < 0.6``, then the flags in the code's
order; every position from the first EOS on gets 0.
"""

import math

import pytest
import torch

from finegrain.errors import ConfigError, DataError
from finegrain.losses.bt import bradley_terry_loss
from finegrain.losses.token_cls import (
    OFFICIAL_NEUTRAL_BAND,
    TLCR_REWARD_MODES,
    minimal_edit_loss,
    tlcr_token_rewards,
)

F64 = torch.float64

# finegrain mode -> the official code's flags
FLAGS = {
    "continuous": dict(sum_to_one_reward=True),  # with double_softmax_compat: the code's continuous reward
    "sign": dict(fixed_reward=True),
    "fixed": dict(fixed_reward=True, sum_to_one_reward=True),
    "thresholded": dict(),
    "positive": dict(sum_to_one_reward=True, positive_reward_only=True),
    "negative": dict(sum_to_one_reward=True, negative_reward_only=True),
}


def official_forward_value(logits, c_ind, *, fixed_reward=False, sum_to_one_reward=False, positive_reward_only=False,
                           negative_reward_only=False, positive_reward=1.0, negative_reward=-1.0,
                           random_draws=None):
    """One response: ``logits (T, 2)``, rewards on ``[0, c_ind)`` (c_ind = the first EOS), 0 from there on."""
    out = [0.0] * logits.shape[0]
    prob = torch.softmax(logits.double(), dim=-1)  # discriminator_token_prob
    token_prob = prob[:c_ind].softmax(dim=1)  # the second softmax
    decision_prob, decision = token_prob.max(dim=-1)
    reward_sign = (-1) * (-1) ** decision
    token_reward = torch.where((0.4 < decision_prob) & (decision_prob < 0.6), 0, decision_prob)
    if random_draws is not None:  # --random_dense_reward, with the draws given
        u, m = random_draws
        reward_sign = torch.where(u <= 0.4, -1.0, u)
        reward_sign = torch.where(reward_sign >= 0.6, 1.0, reward_sign)
        reward_sign = torch.where((reward_sign < 0.6) & (reward_sign > 0.4), 0.0, reward_sign)
        token_reward = (1 - 0.55) * m + 0.55
    token_reward = reward_sign * token_reward
    if fixed_reward:
        token_reward = torch.where(token_reward > 0, positive_reward, torch.where(token_reward < 0, negative_reward,
                                                                                   token_reward))
    if sum_to_one_reward:
        token_reward = 2 * token_prob[:, 1] - 1
        if positive_reward_only:
            token_reward = torch.where(token_reward < 0, 0, token_reward)
        if negative_reward_only:
            token_reward = torch.where(token_reward > 0, 0, token_reward)
        if fixed_reward:
            token_reward = torch.where(token_reward > 0, positive_reward,
                                       torch.where(token_reward < 0, negative_reward, token_reward))
    out[:c_ind] = token_reward.tolist()
    return out


def case(seed=0, B=4, T=9, scale=2.0):
    """Random logits (wide enough to cross the neutral band both ways), ragged rows, EOS at each row's end."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, 2, generator=g, dtype=F64) * scale
    lengths = torch.tensor([T, T - 2, 3, 1][:B])
    mask = torch.arange(T)[None] < lengths[:, None]
    eos = torch.zeros(B, T, dtype=torch.bool)
    eos[torch.arange(B), lengths - 1] = True  # the last valid token is EOS
    return logits, mask, eos, lengths


@pytest.mark.parametrize("mode", [m for m in TLCR_REWARD_MODES if m != "random"])
def test_modes_equal_the_official_code_per_response(mode):
    """With the second softmax on (the code's continuous value), every mode equals the code's flags token by token;
    the code writes nothing from the first EOS on, which ``end_mask`` reproduces."""
    for seed in range(5):
        logits, mask, eos, lengths = case(seed)
        got = tlcr_token_rewards(logits, mask, mode=mode, end_mask=eos, double_softmax_compat=True)
        for b, n in enumerate(lengths.tolist()):
            want = official_forward_value(logits[b], n - 1, **FLAGS[mode])  # c_ind = the EOS position
            assert got[b].tolist() == pytest.approx(want, abs=1e-14), (mode, seed, b)


@pytest.mark.parametrize("mode", ["sign", "fixed", "thresholded"])
def test_discrete_modes_do_not_depend_on_the_second_softmax(mode):
    logits, mask, eos, _ = case(7)
    a = tlcr_token_rewards(logits, mask, mode=mode, end_mask=eos)
    b = tlcr_token_rewards(logits, mask, mode=mode, end_mask=eos, double_softmax_compat=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_single_softmax_modes_by_hand():
    """δ = 2P(+) − 1 = tanh((z₁ − z₀)/2). Tokens with δ = 0.1, 0.5, −0.5, 0.9, and just inside / outside the band
    ln 1.5 (the code's ``0.4 < max q < 0.6`` with ``max q = σ(|δ|)``): continuous = δ; sign = (0, 1, −1, 1, 0, −1);
    thresholded = sign(δ)·σ(|δ|) outside the band; positive = max(δ, 0); negative = min(δ, 0); with band 0.6 and
    values (+2, −3): sign = (0, 0, 0, 2, 0, 0), fixed = (2, 2, −3, 2, 2, −3)."""
    edge = math.log(1.5)
    deltas = [0.1, 0.5, -0.5, 0.9, edge - 1e-9, -edge - 1e-9]
    logits = torch.zeros(1, 6, 2, dtype=F64)
    logits[0, :, 1] = torch.tensor([2 * math.atanh(d) for d in deltas], dtype=F64)
    mask = torch.ones(1, 6, dtype=torch.bool)

    def r(mode, **kw):
        return tlcr_token_rewards(logits, mask, mode=mode, **kw)[0].tolist()

    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert r("continuous") == pytest.approx(deltas, abs=1e-14)
    assert r("sign") == [0.0, 1.0, -1.0, 1.0, 0.0, -1.0]
    assert r("thresholded") == pytest.approx([0.0, sig(0.5), -sig(0.5), sig(0.9), 0.0, -sig(edge)], abs=1e-8)
    assert sig(edge) == pytest.approx(0.6, abs=1e-15)  # the code's band edge, max q = 0.6
    assert r("positive") == pytest.approx([0.1, 0.5, 0.0, 0.9, edge - 1e-9, 0.0], abs=1e-14)
    assert r("negative") == pytest.approx([0.0, 0.0, -0.5, 0.0, 0.0, -edge - 1e-9], abs=1e-14)
    assert r("sign", neutral_band=0.6, positive_value=2.0, negative_value=-3.0) == [0.0, 0.0, 0.0, 2.0, 0.0, 0.0]
    assert r("fixed", positive_value=2.0, negative_value=-3.0) == [2.0, 2.0, -3.0, 2.0, 2.0, -3.0]
    assert OFFICIAL_NEUTRAL_BAND == pytest.approx(math.log(0.6 / 0.4), abs=1e-15)


def test_random_mode_equals_the_official_draws_and_their_distribution():
    """The same draws (sign uniform first, magnitude second) through the official code's formula; over many tokens
    the signs are −1/0/+1 with frequencies 0.4/0.2/0.4 and magnitudes lie in [0.55, 1); the logits are not read."""
    logits, mask, eos, lengths = case(3)
    got = tlcr_token_rewards(logits, mask, mode="random", end_mask=eos, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    u = torch.rand(mask.shape, generator=g, dtype=F64)
    m = torch.rand(mask.shape, generator=g, dtype=F64)
    for b, n in enumerate(lengths.tolist()):
        want = official_forward_value(logits[b], n - 1, random_draws=(u[b, : n - 1], m[b, : n - 1]))
        assert got[b].tolist() == pytest.approx(want, abs=1e-14)
    other = tlcr_token_rewards(-logits, mask, mode="random", end_mask=eos, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(other, got, rtol=0, atol=0)

    big = torch.zeros(200, 500, 2)
    r = tlcr_token_rewards(big, torch.ones(200, 500, dtype=torch.bool), mode="random",
                           generator=torch.Generator().manual_seed(0))
    n = r.numel()
    assert (r < 0).sum().item() / n == pytest.approx(0.4, abs=0.005)
    assert (r == 0).sum().item() / n == pytest.approx(0.2, abs=0.005)
    nonzero = r[r != 0].abs()
    assert nonzero.min() >= 0.55 and nonzero.max() < 1.0
    assert nonzero.mean().item() == pytest.approx(0.775, abs=0.005)


def test_end_token_gets_zero_and_the_lag_moves_the_last_content_score_onto_it():
    """Rewards (0.1, 0.2, 0.3, EOS: 0.9): eos zeroed -> (0.1, 0.2, 0.3, 0); with lag 1 the EOS action gets the last
    content token's 0.3, as in the official code; without end_mask the model's own 0.9 stays (our old default)."""
    logits = torch.zeros(1, 5, 2, dtype=F64)
    logits[0, :4, 1] = torch.tensor([2 * math.atanh(v) for v in (0.1, 0.2, 0.3, 0.9)], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]]).bool()
    eos = torch.tensor([[0, 0, 0, 1, 0]]).bool()
    assert tlcr_token_rewards(logits, mask).tolist()[0] == pytest.approx([0.1, 0.2, 0.3, 0.9, 0.0], abs=1e-14)
    assert tlcr_token_rewards(logits, mask, end_mask=eos).tolist()[0] == pytest.approx([0.1, 0.2, 0.3, 0.0, 0.0],
                                                                                      abs=1e-14)
    assert tlcr_token_rewards(logits, mask, end_mask=eos, lag=1).tolist()[0] == pytest.approx(
        [0.0, 0.1, 0.2, 0.3, 0.0], abs=1e-14)
    for mode in TLCR_REWARD_MODES:  # every mode: 0 on the end token and outside the mask
        r = tlcr_token_rewards(logits, mask, end_mask=eos, mode=mode, generator=torch.Generator().manual_seed(0))
        assert r[0, 3] == 0 and r[0, 4] == 0


def test_mode_errors():
    logits, mask, eos, _ = case()
    with pytest.raises(ConfigError, match="mode"):
        tlcr_token_rewards(logits, mask, mode="binary")
    with pytest.raises(ConfigError, match="neutral_band"):
        tlcr_token_rewards(logits, mask, mode="sign", neutral_band=1.5)
    with pytest.raises(DataError, match="end_mask"):
        tlcr_token_rewards(logits, mask, end_mask=eos[:, :3])


# --------------------------------------------------------------------------------------- minimal edits, edit weight


def edit_case():
    """Revision rewards (0.5, 1.0, −0.2) labels (0, +1, +1); rejected (0.3, −0.4, 0.7, pad) labels (0, −1, −1)."""
    rev = torch.tensor([[0.5, 1.0, -0.2]], dtype=F64, requires_grad=True)
    rej = torch.tensor([[0.3, -0.4, 0.7, 9.0]], dtype=F64, requires_grad=True)
    return (rev, torch.tensor([[0, 1, 1]]), torch.ones(1, 3, dtype=torch.bool),
            rej, torch.tensor([[0, -1, -1, 0]]), torch.tensor([[1, 1, 1, 0]]).bool())


def test_edit_weight_zero_is_plain_bradley_terry_on_summed_token_rewards():
    """Edit term off: the loss is −log σ(S_w − S_l) with S the masked sums, and its gradient is BT's: every valid
    token of y_w gets −σ(S_l − S_w), every valid token of y_l +σ(S_l − S_w), padding 0 (naive, float64)."""
    rev, rev_labels, rev_mask, rej, rej_labels, rej_mask = edit_case()
    chosen = torch.tensor([[0.2, 0.9, 0.4, -0.1]], dtype=F64, requires_grad=True)
    s_w = chosen.sum(1)
    out = minimal_edit_loss(rev, rev_labels, rev_mask, rej, rej_labels, rej_mask, chosen_scores=s_w, edit_weight=0.0)
    s_l = 0.3 - 0.4 + 0.7
    want = bradley_terry_loss(s_w.detach(), torch.tensor([s_l], dtype=F64)).losses
    torch.testing.assert_close(out.losses.detach(), want, rtol=0, atol=1e-15)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-(1.4 - s_l))), abs=1e-14)
    assert out.token_losses.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-14)  # reported, not trained
    out.losses.sum().backward()
    g = 1 / (1 + math.exp(1.4 - s_l))  # σ(S_l − S_w)
    assert chosen.grad[0].tolist() == pytest.approx([-g] * 4, abs=1e-14)
    assert rej.grad[0].tolist() == pytest.approx([g, g, g, 0.0], abs=1e-14)
    assert rev.grad is None or (rev.grad == 0).all()  # the revision enters only through the edit term


def test_edit_weight_scales_the_edit_term_and_both_off_is_refused():
    rev, rev_labels, rev_mask, rej, rej_labels, rej_mask = edit_case()
    nls = lambda x: math.log1p(math.exp(-x))  # noqa: E731  (−log σ(x))
    out = minimal_edit_loss(rev, rev_labels, rev_mask, rej, rej_labels, rej_mask, edit_weight=2.5, seq_weight=0.5)
    assert out.losses.item() == pytest.approx(2.5 * nls(0.5) + 0.5 * nls(0.7), abs=1e-14)
    with pytest.raises(ConfigError, match="edit_weight"):
        minimal_edit_loss(rev, rev_labels, rev_mask, rej, rej_labels, rej_mask, edit_weight=0.0, seq_weight=0.0)
    with pytest.raises(ConfigError, match="edit_weight"):
        minimal_edit_loss(rev, rev_labels, rev_mask, rej, rej_labels, rej_mask, edit_weight=-1.0)
