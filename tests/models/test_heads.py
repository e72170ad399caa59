"""Reward heads; the SRM aggregation (docs/methods/reward-models.md) against a naive per-example loop in float64."""

import doctest
import math

import pytest
import torch

import finegrain.models.heads as heads
from finegrain.data.segmentation import insert_end_tokens
from finegrain.errors import ConfigError, DataError
from finegrain.models.heads import (
    ScalarHead,
    SentenceRewardHead,
    TwoClassHead,
    rope_rotate,
    srm_boundary_mask,
)


def test_doctests():
    assert doctest.testmod(heads, raise_on_error=False).failed == 0


def naive_linear(lin, x):
    return [sum(w * xi for w, xi in zip(row, x)) + bias for row, bias in zip(lin.weight.tolist(), lin.bias.tolist())]


def naive_rope(x, j, theta):
    d, out = len(x), []
    for i in range(d // 2):
        ang = j * theta ** (-2 * i / d)
        out += [x[2 * i] * math.cos(ang) - x[2 * i + 1] * math.sin(ang),
                x[2 * i] * math.sin(ang) + x[2 * i + 1] * math.cos(ang)]
    return out


def naive_srm(head, hidden, mask, fallback, weighted_sum=True):
    """One row at a time, one boundary at a time, with Python scalars for RoPE and the softmax."""
    scores, all_terms = [], []
    for b in range(hidden.shape[0]):
        pos = [i for i in range(hidden.shape[1]) if mask[b, i]] or [int(fallback[b])]
        h = [hidden[b, i].tolist() for i in pos]
        v = [naive_linear(head.value, hi)[0] for hi in h]
        if not weighted_sum:
            scores.append(sum(v))
            all_terms.append(v)
            continue
        s = [v[0]] + [v[j] - v[j - 1] for j in range(1, len(v))]
        n = len(pos) - 1
        q = naive_rope(naive_linear(head.query, h[n]), n, head.rope_theta)
        keys = [naive_rope(naive_linear(head.key, h[j]), j, head.rope_theta) for j in range(len(pos))]
        logits = [sum(a * c for a, c in zip(q, k)) / math.sqrt(head.embed_dim) for k in keys]
        z = max(logits)
        e = [math.exp(x - z) for x in logits]
        a = [x / sum(e) for x in e]
        terms = [a[j] * s[j] for j in range(len(pos))]
        scores.append(sum(terms))
        all_terms.append(terms)
    return scores, all_terms


def random_case(seed=0, B=5, L=12, H=8):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) < 0.35
    mask[0] = False  # no boundary: fallback
    mask[1] = False
    mask[1, 4] = True  # one boundary
    mask[2] = True  # a boundary at every position
    fallback = torch.randint(0, L, (B,), generator=g)
    return hidden, mask, fallback


@pytest.mark.parametrize("weighted_sum", [True, False])
def test_srm_matches_naive_loop_in_float64(weighted_sum):
    torch.manual_seed(0)
    head = SentenceRewardHead(8, embed_dim=6, weighted_sum=weighted_sum).double()
    hidden, mask, fallback = random_case()
    with torch.no_grad():
        out = head(hidden, mask, fallback_positions=fallback)
        want_scores, want_terms = naive_srm(head, hidden, mask, fallback, weighted_sum)
    torch.testing.assert_close(out.score, torch.tensor(want_scores, dtype=torch.float64), rtol=0, atol=1e-10)
    for b, terms in enumerate(want_terms):
        k = len(terms)
        assert out.term_mask[b].tolist() == [True] * k + [False] * (out.terms.shape[1] - k)
        torch.testing.assert_close(out.terms[b, :k], torch.tensor(terms, dtype=torch.float64), rtol=0, atol=1e-10)
        assert not out.terms[b, k:].any() and not out.attention[b, k:].any()
    assert out.fell_back.tolist() == [True] + [False] * 4
    assert out.num_boundaries.tolist() == [1, 1, 12] + mask[3:].sum(1).tolist()
    assert out.boundary_positions[0, 0] == fallback[0] and out.boundary_positions[1, 0] == 4


def test_terms_sum_to_score_and_attention_sums_to_one():
    torch.manual_seed(1)
    head = SentenceRewardHead(8, embed_dim=4).double()
    hidden, mask, fallback = random_case(seed=3)
    out = head(hidden, mask, fallback_positions=fallback)
    torch.testing.assert_close(out.terms.sum(1), out.score, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.attention.sum(1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)
    # differential rewards telescope: sum_j s_j = v at the last boundary
    v_last = head.value(hidden[torch.arange(5), out.boundary_positions.gather(1, (out.num_boundaries - 1)[:, None])[:, 0]])
    torch.testing.assert_close(out.sentence_rewards.sum(1), v_last[:, 0], rtol=0, atol=1e-12)
    out.score.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_two_sentence_rope_by_hand():
    """H = d = 2, identity q/k projections, value weights (1, 3), no biases.

    Boundaries e_0 (h = (1, 0)) and e_1 (h = (0, 1)); with d = 2 the single frequency is θ^0 = 1, so sentence j is
    rotated by j radians. v = (1, 3) -> s = (1, 2). q̃ = R(1)(0, 1) = (−sin 1, cos 1); k̃_0 = (1, 0);
    k̃_1 = R(1)(0, 1) = q̃. Logits: q̃·k̃_0 / √2 = −sin 1 / √2, q̃·k̃_1 / √2 = 1 / √2, so
    a_0 = 1 / (1 + exp((1 + sin 1)/√2)), a_1 = 1 − a_0 and R = a_0 + 2 a_1.
    """
    head = SentenceRewardHead(2, embed_dim=2).double()
    with torch.no_grad():
        for lin in (head.query, head.key):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        head.value.weight.copy_(torch.tensor([[1.0, 3.0]]))
        head.value.bias.zero_()
    hidden = torch.tensor([[[1.0, 0.0], [5.0, 5.0], [0.0, 1.0]]], dtype=torch.float64)
    out = head(hidden, torch.tensor([[True, False, True]]))
    a0 = 1 / (1 + math.exp((1 + math.sin(1)) / math.sqrt(2)))
    assert out.attention[0].tolist() == pytest.approx([a0, 1 - a0], abs=1e-14)
    assert out.sentence_rewards[0].tolist() == [1.0, 2.0]
    assert out.score.item() == pytest.approx(a0 + 2 * (1 - a0), abs=1e-14)
    assert out.boundary_positions.tolist() == [[0, 2]]


def test_rope_scores_depend_only_on_relative_index():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    dots = [(rope_rotate(q, torch.tensor(m)) * rope_rotate(k, torch.tensor(n))).sum() for m, n in [(3, 1), (7, 5), (2, 0)]]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), rtol=0, atol=1e-12)
    torch.testing.assert_close(rope_rotate(q, torch.tensor(0)), q)
    with pytest.raises(ConfigError):
        rope_rotate(torch.ones(3), torch.tensor(1))


def test_positions_input_equals_mask_input():
    torch.manual_seed(2)
    head = SentenceRewardHead(8, embed_dim=4).double()
    hidden, mask, fallback = random_case(seed=5)
    by_mask = head(hidden, mask, fallback_positions=fallback)
    K = int(mask.sum(1).max())
    positions = torch.full((5, K + 2), -1)
    for b in range(5):
        idx = mask[b].nonzero()[:, 0]
        positions[b, : len(idx)] = idx
    by_pos = head(hidden, boundary_positions=positions, fallback_positions=fallback)
    torch.testing.assert_close(by_pos.score, by_mask.score, rtol=0, atol=0)


def test_bad_boundaries():
    head = SentenceRewardHead(4, embed_dim=2, max_sentences=3)
    hidden = torch.randn(2, 6, 4)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :2] = True
    with pytest.raises(DataError, match="row 1 has no sentence boundary"):
        head(hidden, mask)
    mask[1, :4] = True
    with pytest.raises(DataError, match="row 1 has 4 sentence boundaries, more than max_sentences=3"):
        head(hidden, mask)
    with pytest.raises(DataError, match="increasing"):
        head(hidden, boundary_positions=torch.tensor([[2, 1], [0, -1]]))
    with pytest.raises(DataError, match="increasing"):
        head(hidden, boundary_positions=torch.tensor([[-1, 1], [0, -1]]))
    with pytest.raises(ConfigError):
        head(hidden, mask, boundary_positions=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ConfigError):
        SentenceRewardHead(4, embed_dim=3)


def test_low_precision_attention_runs_in_float32():
    torch.manual_seed(3)
    head = SentenceRewardHead(8, embed_dim=4).to(torch.bfloat16)
    hidden, mask, fallback = random_case(seed=6)
    out = head(hidden.to(torch.bfloat16), mask, fallback_positions=fallback)
    assert out.attention.dtype == torch.float32 and out.score.dtype == torch.float32
    torch.testing.assert_close(out.attention.sum(1), torch.ones(5))


def test_boundary_mask_in_the_padded_layout_with_end_tokens():
    """Segmentation mode (a) -> srm_boundary_mask -> head: boundaries sit exactly on the <END> tokens."""
    END, PAD = 9, 0
    rows = [insert_end_tokens([3, 4], [5, 6, 7, 2], [0, 2], END, 2), insert_end_tokens([3], [5, 2], [0], END, 2)]
    P = max(len(r.prompt_ids) for r in rows)
    T = max(len(r.response_ids) for r in rows)
    ids = torch.tensor([[PAD] * (P - len(r.prompt_ids)) + r.prompt_ids + r.response_ids + [PAD] * (T - len(r.response_ids))
                        for r in rows])
    mask = srm_boundary_mask([r.response_boundaries for r in rows], P, T)
    assert (ids[mask] == END).all() and mask.sum().item() == (ids == END).sum().item() == 5
    out = SentenceRewardHead(4, embed_dim=2)(torch.randn(2, P + T, 4), mask)
    assert out.num_boundaries.tolist() == [3, 2]
    with pytest.raises(DataError):
        srm_boundary_mask([[5]], 2, 3)


def test_token_heads():
    h = torch.randn(2, 5, 8)
    assert ScalarHead(8)(h).shape == (2, 5)
    two = TwoClassHead(8)
    assert two(h).shape == (2, 5, 2) and two.proj.bias is None
