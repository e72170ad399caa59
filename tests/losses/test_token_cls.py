"""TLCR discriminator loss and reward, and the minimal-edit token-RM objectives, against hand-derived values."""

import doctest
import math

import pytest
import torch

import finegrain.losses.token_cls as token_cls
from finegrain.errors import ConfigError, DataError
from finegrain.losses.token_cls import (
    expected_label_rewards,
    minimal_edit_loss,
    tlcr_loss,
    tlcr_sequence_loss,
    tlcr_soft_targets,
    tlcr_token_rewards,
)

F64 = torch.float64
LOG3 = math.log(3)


def test_doctests():
    assert doctest.testmod(token_cls, raise_on_error=False).failed == 0


def test_soft_targets():
    assert tlcr_soft_targets(torch.tensor([[1, -1, 0]])).tolist() == [[[0, 1], [1, 0], [0.5, 0.5]]]


def test_tlcr_loss_by_hand():
    """Every token has logits (0, log 3), so P = (¼, ¾).

    Token losses: positive −log ¾; negative −log ¼; neutral −½(log ¼ + log ¾).
    Revision row 0: labels (+1, 0), 2 tokens          -> L_pos(0) = (−log ¾ − ½ log(3/16)) / 2
    Revision row 1: labels (+1, +1, pad)               -> L_pos(1) = −log ¾
    Rejected row 0: labels (−1, 0, 0)                  -> L_neg(0) = (−log ¼ − log(3/16)) / 3
    Rejected row 1: labels (0, pad, pad)               -> L_neg(1) = −½ log(3/16)
    L = mean(L_pos) + mean(L_neg).
    Hard variant: neutral tokens dropped -> L_pos = (−log ¾, −log ¾), L_neg = (−log ¼, 0).
    """
    z = torch.tensor([0.0, LOG3], dtype=F64)
    rev_logits, rej_logits = z.expand(2, 3, 2), z.expand(2, 3, 2)
    rev_labels, rev_mask = torch.tensor([[1, 0, 0], [1, 1, 0]]), torch.tensor([[1, 1, 0], [1, 1, 0]]).bool()
    rej_labels, rej_mask = torch.tensor([[-1, 0, 0], [0, 0, 0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    neutral = -0.5 * math.log(3 / 16)
    pos = [(-math.log(0.75) + neutral) / 2, -math.log(0.75)]
    neg = [(-math.log(0.25) + 2 * neutral) / 3, neutral]
    out = tlcr_loss(rev_logits, rev_labels, rev_mask, rej_logits, rej_labels, rej_mask)
    assert out.positive_losses.tolist() == pytest.approx(pos, abs=1e-14)
    assert out.negative_losses.tolist() == pytest.approx(neg, abs=1e-14)
    assert out.loss.item() == pytest.approx(sum(pos) / 2 + sum(neg) / 2, abs=1e-14)
    hard = tlcr_loss(rev_logits, rev_labels, rev_mask, rej_logits, rej_labels, rej_mask, hard=True)
    assert hard.positive_losses.tolist() == pytest.approx([-math.log(0.75)] * 2, abs=1e-14)
    assert hard.negative_losses.tolist() == pytest.approx([-math.log(0.25), 0.0], abs=1e-14)


def test_tlcr_sequence_loss_against_official_style_loop():
    """Per sequence: soft CE over the response tokens, mean; padding (even with junk labels) is inert."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 2, generator=g, dtype=F64)
    labels = torch.randint(-1, 2, (3, 5), generator=g)
    lengths = [5, 2, 1]
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    labels[~mask] = -100
    got = tlcr_sequence_loss(logits, labels, mask)
    for b, n in enumerate(lengths):
        total = 0.0
        for t in range(n):
            y = labels[b, t].item()
            target = {1: (0.0, 1.0), -1: (1.0, 0.0), 0: (0.5, 0.5)}[y]
            logp = torch.log_softmax(logits[b, t], -1).tolist()
            total -= target[0] * logp[0] + target[1] * logp[1]
        assert got[b].item() == pytest.approx(total / n, abs=1e-13)


def test_tlcr_reward_is_two_p_minus_one():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 2, generator=g, dtype=F64) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    r = tlcr_token_rewards(logits, mask)
    want = (2 * torch.softmax(logits, -1)[..., 1] - 1) * mask
    torch.testing.assert_close(r, want, rtol=0, atol=1e-14)
    assert r.dtype == F64 and tlcr_token_rewards(logits.float(), mask).dtype == torch.float32


def test_double_softmax_compat_equals_tanh_of_half_probability_gap():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 2, generator=g, dtype=F64) * 10
    mask = torch.ones(2, 4, dtype=torch.bool)
    r = tlcr_token_rewards(logits, mask, double_softmax_compat=True)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(r, 2 * torch.softmax(p, -1)[..., 1] - 1, rtol=0, atol=1e-14)
    torch.testing.assert_close(r, torch.tanh((p[..., 1] - p[..., 0]) / 2), rtol=0, atol=1e-14)
    assert r.abs().max() <= math.tanh(0.5) + 1e-12  # 0.462


def test_lag_shifts_to_the_next_action():
    """Official-code alignment: action t gets the score of token t−1, the first action 0, padding stays 0."""
    logits = torch.zeros(1, 4, 2, dtype=F64)
    logits[0, :, 1] = torch.tensor([2 * math.atanh(0.1), 2 * math.atanh(0.2), 2 * math.atanh(0.3), 5.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    assert tlcr_token_rewards(logits, mask).tolist()[0] == pytest.approx([0.1, 0.2, 0.3, 0.0], abs=1e-14)
    assert tlcr_token_rewards(logits, mask, lag=1).tolist()[0] == pytest.approx([0.0, 0.1, 0.2, 0.0], abs=1e-14)
    with pytest.raises(ConfigError):
        tlcr_token_rewards(logits, mask, lag=-1)
    with pytest.raises(DataError):
        tlcr_token_rewards(logits[..., :1], mask)


def edit_case():
    """One pair: revision rewards (0.5, 1.0, −0.2) labels (0, +1, +1); rejected rewards (0.3, −0.4, 0.7, pad)
    labels (0, −1, −1)."""
    rev = torch.tensor([[0.5, 1.0, -0.2]], dtype=F64, requires_grad=True)
    rev_labels, rev_mask = torch.tensor([[0, 1, 1]]), torch.ones(1, 3, dtype=torch.bool)
    rej = torch.tensor([[0.3, -0.4, 0.7, 9.0]], dtype=F64, requires_grad=True)
    rej_labels, rej_mask = torch.tensor([[0, -1, -1, 0]]), torch.tensor([[1, 1, 1, 0]]).bool()
    return rev, rev_labels, rev_mask, rej, rej_labels, rej_mask


def test_edit_bt_objective_by_hand():
    """Σ_A r = 1.0 − 0.2 = 0.8, Σ_D r = −0.4 + 0.7 = 0.3 -> edit loss −log σ(0.5).
    Sequence term with S(y_e) = 1.3, S(y_l) = 0.6 -> −log σ(0.7); with chosen_scores 2.0 -> −log σ(1.4)."""
    rev, rev_labels, rev_mask, rej, rej_labels, rej_mask = edit_case()
    nls = lambda x: math.log1p(math.exp(-x))  # noqa: E731  (−log σ(x))
    out = minimal_edit_loss(rev, rev_labels, rev_mask, rej, rej_labels, rej_mask)
    assert out.token_losses.item() == pytest.approx(nls(0.5), abs=1e-14)
    assert out.sequence_losses.item() == pytest.approx(nls(0.7), abs=1e-14)
    assert out.losses.item() == pytest.approx(nls(0.5) + nls(0.7), abs=1e-14)
    assert out.accuracies.tolist() == [1.0]
    out.losses.sum().backward()
    assert rej.grad[0, 3] == 0  # padding is inert
    with_chosen = minimal_edit_loss(rev, rev_labels, rev_mask, rej, rej_labels, rej_mask,
                                    chosen_scores=torch.tensor([2.0], dtype=F64), seq_weight=0.5)
    assert with_chosen.losses.item() == pytest.approx(nls(0.5) + 0.5 * nls(1.4), abs=1e-14)
    no_seq = minimal_edit_loss(rev, rev_labels, rev_mask, rej, rej_labels, rej_mask, seq_weight=0.0)
    assert no_seq.losses.item() == pytest.approx(nls(0.5), abs=1e-14) and no_seq.sequence_losses.item() == 0


def test_token_classification_mse_by_hand():
    """Revision: ((0.5−0)² + (1−1)² + (−0.2−1)²)/3 = 1.69/3; rejected: ((0.3)² + (−0.4+1)² + (0.7+1)²)/3 = 3.34/3."""
    rev, rev_labels, rev_mask, rej, rej_labels, rej_mask = edit_case()
    out = minimal_edit_loss(rev, rev_labels, rev_mask, rej, rej_labels, rej_mask, objective="token_cls")
    assert out.losses.item() == pytest.approx(1.69 / 3 + 3.34 / 3, abs=1e-14)
    assert out.sequence_losses.item() == 0


def test_token_classification_ce_and_expected_label():
    """Logits (0, 0, log 2) -> P = (¼, ¼, ½) over labels (−1, 0, +1): expected label ¼.
    CE of label +1: −log ½; of 0 and of −1: −log ¼. Revision labels (0, +1) -> (log 4 + log 2)/2;
    rejected labels (−1,) -> log 4."""
    z = torch.tensor([0.0, 0.0, math.log(2)], dtype=F64)
    assert expected_label_rewards(z).item() == pytest.approx(0.25, abs=1e-15)
    out = minimal_edit_loss(z.expand(1, 2, 3), torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool),
                            z.expand(1, 1, 3), torch.tensor([[-1]]), torch.ones(1, 1, dtype=torch.bool),
                            objective="token_cls", cls_loss="ce")
    assert out.losses.item() == pytest.approx((math.log(4) + math.log(2)) / 2 + math.log(4), abs=1e-14)
    assert out.accuracies.tolist() == [0.0]  # margin ¼ − ¼ = 0


def test_bad_inputs():
    rev, rev_labels, rev_mask, rej, rej_labels, rej_mask = edit_case()
    with pytest.raises(ConfigError):
        minimal_edit_loss(rev, rev_labels, rev_mask, rej, rej_labels, rej_mask, objective="nope")
    with pytest.raises(ConfigError):
        minimal_edit_loss(rev, rev_labels, rev_mask, rej, rej_labels, rej_mask, objective="token_cls", cls_loss="l1")
    with pytest.raises(DataError, match="labels must be -1, 0 or \\+1"):
        minimal_edit_loss(rev, torch.tensor([[0, 2, 1]]), rev_mask, rej, rej_labels, rej_mask)
    with pytest.raises(DataError, match="must agree"):
        minimal_edit_loss(rev, rev_labels[:, :2], rev_mask, rej, rej_labels, rej_mask)
    with pytest.raises(DataError, match="3 classes"):
        minimal_edit_loss(rev, rev_labels, rev_mask, rej, rej_labels, rej_mask, objective="token_cls", cls_loss="ce")
