import pytest
import torch

from finegrain.errors import NonFiniteError
from finegrain.rewards.placement import place_on_last_token
from finegrain.rl.rewards import RunningMoments, dense_rewards, reward_metrics
from finegrain.types import TokenRewards

# Three responses of a 5-column response block: row 0 ends with EOS at t=2, row 1 with EOS at t=4,
# row 2 was truncated at max_new_tokens (no EOS; its last token t=4 is still the last action).
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)


def _source(values=None, seq=None, mask=MASK):
    values = torch.zeros(mask.shape) if values is None else values
    return TokenRewards(values=torch.where(mask, values, 0.0), mask=mask, seq_reward=seq)


def test_sequence_score_goes_on_the_last_valid_token():
    out = dense_rewards(_source(seq=torch.tensor([1.0, 2.0, 3.0])), MASK)
    want = torch.zeros(3, 5)
    want[0, 2], want[1, 4], want[2, 4] = 1.0, 2.0, 3.0
    torch.testing.assert_close(out["raw"], want)
    torch.testing.assert_close(out["penalized"], want)
    torch.testing.assert_close(place_on_last_token(torch.tensor([1.0, 2.0, 3.0]), MASK), want)


def test_kl_penalty_is_per_token_and_ignores_positions_after_eos():
    """R_t = c·r_t − c_KL·KL_t on every action; after EOS everything is 0, even a NaN KL there."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5, generator=g)
    kl = torch.rand(3, 5, generator=g)
    kl[0, 3:] = float("nan")  # after row 0's EOS: log-probs of padding are never looked at
    out = dense_rewards(_source(values), MASK, scales=2.0, kl=kl, kl_coef=0.1)
    want = torch.where(MASK, 2.0 * values - 0.1 * kl, 0.0)
    torch.testing.assert_close(out["penalized"], want)
    torch.testing.assert_close(out["kl"], torch.where(MASK, kl, 0.0))
    assert (out["penalized"][~MASK] == 0).all() and torch.isfinite(out["penalized"]).all()


def test_values_after_eos_from_a_source_are_dropped():
    """A source whose own mask runs past EOS (e.g. scored on a longer window) contributes nothing there."""
    wide = torch.ones(3, 5, dtype=torch.bool)
    src = TokenRewards(values=torch.ones(3, 5), mask=wide)
    out = dense_rewards(src, MASK)
    torch.testing.assert_close(out["raw"], MASK.float())


def test_clipping_applies_to_the_task_reward_before_the_kl_penalty():
    """TLCR (docs/methods/ppo.md): R_t = clip(r_t, −5, 5) − c_KL·K̃_t."""
    values = torch.tensor([[7.0, -9.0, 1.0, 0.0, 0.0]] * 3)
    kl = torch.full((3, 5), 2.0)
    out = dense_rewards(_source(values), MASK, kl=kl, kl_coef=1.0, clip=5.0)
    torch.testing.assert_close(out["score"][0], torch.tensor([5.0, -5.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(out["penalized"][0], torch.tensor([3.0, -7.0, -1.0, 0.0, 0.0]))
    torch.testing.assert_close(out["raw"][0], torch.tensor([7.0, -9.0, 1.0, 0.0, 0.0]))


def test_several_sources_with_scales():
    a = _source(torch.ones(3, 5))
    b = _source(seq=torch.tensor([1.0, 1.0, 1.0]))
    out = dense_rewards({"token_rm": a, "seq_rm": b}, MASK, scales={"token_rm": 0.5, "seq_rm": 3.0})
    torch.testing.assert_close(out["raw/token_rm"], 0.5 * MASK.float())
    torch.testing.assert_close(out["raw/seq_rm"], place_on_last_token(torch.full((3,), 3.0), MASK))
    torch.testing.assert_close(out["raw"], out["raw/token_rm"] + out["raw/seq_rm"])
    metrics = reward_metrics(out, MASK)
    assert metrics["rewards/raw"] == pytest.approx((0.5 * (3 + 5 + 5) + 9) / 3)
    assert metrics["rewards/kl"] == 0.0
    assert set(metrics) == {"rewards/raw", "rewards/kl", "rewards/penalized", "rewards/raw/token_rm",
                            "rewards/raw/seq_rm"}


@pytest.mark.parametrize("where", ["values", "seq_reward"])
def test_non_finite_reward_names_its_source(where):
    values = torch.zeros(3, 5)
    seq = torch.zeros(3)
    if where == "values":
        values[1, 3] = float("nan")
    else:
        seq[2] = float("inf")
    src = TokenRewards(values=values, mask=MASK, seq_reward=seq)
    with pytest.raises(NonFiniteError, match="'sentence_rm'.*row (1|2)"):
        dense_rewards({"ok": _source(), "sentence_rm": src}, MASK)


def test_non_finite_kl_on_an_action_raises():
    kl = torch.zeros(3, 5)
    kl[1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="'kl'"):
        dense_rewards(_source(), MASK, kl=kl, kl_coef=0.1)


def test_batch_normalisation_whitens_sequence_returns_and_keeps_sparsity():
    g = torch.Generator().manual_seed(1)
    values = torch.zeros(3, 5)
    values[:, 0] = torch.randn(3, generator=g)
    out = dense_rewards(_source(values, seq=torch.tensor([1.0, 4.0, -2.0])), MASK, normalize="batch")
    returns = (out["raw"] * MASK).sum(-1).double()
    got = (out["score"] * MASK).sum(-1).double()
    torch.testing.assert_close(got, (returns - returns.mean()) / returns.std(unbiased=False), atol=1e-5, rtol=1e-5)
    # Only the first token (the source's) and the last token (score and centring) are non-zero.
    inner = out["score"][:, 1:2]
    assert (inner == 0).all()
    scaled = dense_rewards(_source(values), MASK, normalize="batch", center=False)
    ratio = scaled["score"][:, 0] / values[:, 0]
    torch.testing.assert_close(ratio, torch.full((3,), ratio[0].item()))


def test_running_normalisation_and_moments_state():
    running = RunningMoments()
    stream = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        seq = torch.randn(3, generator=g) * 3 + 1
        stream.append(seq.double())
        out = dense_rewards(_source(seq=seq), MASK, normalize="running", running=running)
    allv = torch.cat(stream)
    assert running.count == 9
    assert running.mean == pytest.approx(allv.mean().item(), abs=1e-12)
    assert running.var == pytest.approx(allv.var(unbiased=False).item(), abs=1e-12)
    last = (out["score"] * MASK).sum(-1).double()
    torch.testing.assert_close(last, (stream[-1] - running.mean) / running.std, atol=1e-5, rtol=1e-5)
    restored = RunningMoments()
    restored.load_state_dict(running.state_dict())
    assert restored.state_dict() == running.state_dict()
    with pytest.raises(ValueError, match="RunningMoments"):
        dense_rewards(_source(), MASK, normalize="running")


def test_gather_makes_the_statistics_global():
    """With a gather that pretends a second process saw returns (10, 20, 30), the batch moments use all six."""
    seq = torch.tensor([1.0, 2.0, 3.0])
    other = torch.tensor([10.0, 20.0, 30.0])
    out = dense_rewards(_source(seq=seq), MASK, normalize="batch", gather=lambda r: torch.cat([r, other]))
    pooled = torch.cat([seq, other]).double()
    want = (seq.double() - pooled.mean()) / pooled.std(unbiased=False)
    torch.testing.assert_close((out["score"] * MASK).sum(-1).double(), want, atol=1e-6, rtol=1e-6)


def test_equal_returns_do_not_blow_up_dense_values():
    full = torch.ones(3, 5, dtype=torch.bool)
    out = dense_rewards(_source(torch.ones(3, 5), mask=full), full, normalize="batch")
    # Every return is 5: the mean is removed on the last token and the scale stays 1.
    torch.testing.assert_close(out["score"][:, :4], torch.ones(3, 4))
    torch.testing.assert_close(out["score"][:, 4], torch.full((3,), -4.0))


def test_sequence_score_for_an_empty_response_is_an_error():
    mask = MASK.clone()
    mask[1] = False
    src = TokenRewards(values=torch.zeros(3, 5), mask=mask, seq_reward=torch.ones(3))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        dense_rewards(src, mask)


def test_shape_and_mode_errors():
    with pytest.raises(ValueError, match="normalize"):
        dense_rewards(_source(), MASK, normalize="token")
    with pytest.raises(ValueError, match="values"):
        dense_rewards(TokenRewards(torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool)), MASK)
    with pytest.raises(ValueError, match="kl"):
        dense_rewards(_source(), MASK, kl=torch.zeros(3, 4))
