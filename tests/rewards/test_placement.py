"""Placement of sequence and span scores on response tokens, against naive per-element loops."""

import doctest

import pytest
import torch

import finegrain.rewards.placement as placement
from finegrain.errors import DataError
from finegrain.rewards.placement import (
    last_token_index,
    place_at_span_ends,
    place_on_last_token,
    spread_over_spans,
)


def right_padded_mask(lengths, T):
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def test_doctests():
    assert doctest.testmod(placement, raise_on_error=False).failed == 0


def test_last_token_and_scalar_placement_against_loop():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 7, generator=g) < 0.5
    mask[0] = False  # a row without tokens
    scores = torch.randn(6, generator=g, dtype=torch.float64)
    want_idx, want = [], torch.zeros(6, 7, dtype=torch.float64)
    for b in range(6):
        idx = max((t for t in range(7) if mask[b, t]), default=-1)
        want_idx.append(idx)
        if idx >= 0:
            want[b, idx] = scores[b]
    assert last_token_index(mask).tolist() == want_idx
    out = place_on_last_token(scores, mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_span_ends_against_loop():
    g = torch.Generator().manual_seed(1)
    B, T, S = 5, 9, 4
    mask = right_padded_mask([9, 6, 3, 1, 0], T)
    ends = torch.full((B, S), -1)
    for b, length in enumerate([9, 6, 3, 1, 0]):
        k = min(S, length)
        ends[b, :k] = torch.randint(0, max(length, 1), (k,), generator=g)  # duplicates allowed: they add up
    values = torch.randn(B, S, generator=g, dtype=torch.float64, requires_grad=True)
    out = place_at_span_ends(values, ends, mask)
    want = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for j in range(S):
            if ends[b, j] >= 0:
                want[b, ends[b, j]] += values[b, j].item()
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=1e-15)
    assert not out[~mask].any()
    out.sum().backward()
    assert values.grad.tolist() == (ends >= 0).double().tolist()


def test_spread_over_spans_against_loop():
    g = torch.Generator().manual_seed(2)
    B, T, S = 4, 10, 3
    mask = right_padded_mask([10, 7, 4, 0], T)
    ids = torch.randint(-1, S, (B, T), generator=g)
    values = torch.randn(B, S, generator=g, dtype=torch.float64)
    out = spread_over_spans(values, ids, mask)
    want = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for j in range(S):
            members = [t for t in range(T) if ids[b, t] == j and mask[b, t]]
            for t in members:
                want[b, t] = values[b, j] / len(members)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-15)
    # each span's tokens carry exactly its value (when it has any valid token)
    for b in range(B):
        for j in range(S):
            if ((ids[b] == j) & mask[b]).any():
                torch.testing.assert_close(out[b][(ids[b] == j) & mask[b]].sum(), values[b, j])


def test_sentence_rewards_hand_example():
    """Three sentences over 7 tokens (ids [0 0 0 1 1 -1 2]), terms (0.6, -0.3, 0.9): ends 2, 4, 6."""
    mask = torch.ones(1, 7, dtype=torch.bool)
    values = torch.tensor([[0.6, -0.3, 0.9]])
    ends = place_at_span_ends(values, torch.tensor([[2, 4, 6]]), mask)
    torch.testing.assert_close(ends, torch.tensor([[0, 0, 0.6, 0, -0.3, 0, 0.9]]))
    spread = spread_over_spans(values, torch.tensor([[0, 0, 0, 1, 1, -1, 2]]), mask)
    torch.testing.assert_close(spread, torch.tensor([[0.2, 0.2, 0.2, -0.15, -0.15, 0, 0.9]]))


def test_bad_input():
    mask = right_padded_mask([2], 3)
    with pytest.raises(DataError, match="masked-out"):
        place_at_span_ends(torch.ones(1, 1), torch.tensor([[2]]), mask)
    with pytest.raises(DataError, match=r"\[-1, 3\)"):
        place_at_span_ends(torch.ones(1, 1), torch.tensor([[3]]), mask)
    with pytest.raises(DataError, match="span_ends"):
        place_at_span_ends(torch.ones(1, 2), torch.tensor([[0]]), mask)
    with pytest.raises(DataError, match=r"\[-1, 1\)"):
        spread_over_spans(torch.ones(1, 1), torch.tensor([[0, 1, -1]]), mask)
    with pytest.raises(DataError):
        spread_over_spans(torch.ones(1, 1), torch.tensor([[0, 1]]), mask)
    with pytest.raises(DataError):
        place_on_last_token(torch.ones(2), mask)


def test_empty_span_sets():
    mask = right_padded_mask([2], 3)
    assert not place_at_span_ends(torch.ones(1, 0), torch.ones(1, 0, dtype=torch.long), mask).any()
    assert not spread_over_spans(torch.ones(1, 0), torch.full((1, 3), -1), mask).any()
