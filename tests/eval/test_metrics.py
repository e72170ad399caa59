import math

import numpy as np
import pytest
import torch

from finegrain.errors import DataError, NonFiniteError
from finegrain.eval import (
    auroc,
    distinct_n,
    evaluate_token_credit,
    mean_and_stderr,
    mean_token_entropy,
    precision_at_k,
    response_entropy,
    response_length,
    sequential_kl,
    win_rate,
)


def naive_auroc(scores, labels):
    """O(n²) pair count: P(s_pos > s_neg) + ½ P(s_pos = s_neg)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    total = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return total / (len(pos) * len(neg))


def test_win_rate_counts_ties_within_tol():
    """Δ = r - r_ref = [1, 0, -0.05, -1, 0].

    tol = 0.1: wins {1}, ties {0, -0.05, 0}, losses {-1} -> 1/5, 3/5, 1/5; half ties: 0.2 + 0.3 = 0.5.
    tol = 0:   wins {1}, ties {0, 0}, losses {-0.05, -1}   -> 1/5, 2/5, 2/5; half ties: 0.2 + 0.2 = 0.4.
    """
    r = [1.0, 2.0, 3.0, 4.0, 5.0]
    r_ref = [0.0, 2.0, 3.05, 5.0, 5.0]
    wr = win_rate(r, r_ref, tol=0.1)
    assert (wr.win, wr.tie, wr.loss, wr.n) == pytest.approx((0.2, 0.6, 0.2, 5))
    assert wr.win_incl_half_ties == pytest.approx(0.5)
    wr0 = win_rate(torch.tensor(r), np.array(r_ref), tol=0.0)
    assert (wr0.win, wr0.tie, wr0.loss) == pytest.approx((0.2, 0.4, 0.4))
    assert wr0.win_incl_half_ties == pytest.approx(0.4)


def test_win_rate_against_itself_is_all_ties_and_rejects_bad_input():
    wr = win_rate([0.3, 1.0], [0.3, 1.0])
    assert (wr.win, wr.tie, wr.loss, wr.win_incl_half_ties) == (0.0, 1.0, 0.0, 0.5)
    with pytest.raises(NonFiniteError):
        win_rate([float("nan")], [0.0])
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        win_rate([], [])


def test_mean_and_stderr_hand_computed():
    """x = [1, 2, 3, 4]: mean 2.5, s² = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, stderr = sqrt(5/3) / 2."""
    mean, se = mean_and_stderr([1, 2, 3, 4])
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)
    mean1, se1 = mean_and_stderr([7.0])
    assert mean1 == 7.0 and math.isnan(se1)


def test_auroc_tiny_example_by_hand():
    """scores [0.9, 0.8, 0.8, 0.3, 0.1], labels [1, 0, 1, 0, 1].

    Pairs (pos, neg): (0.9, 0.8)=1, (0.9, 0.3)=1, (0.8, 0.8)=½, (0.8, 0.3)=1, (0.1, 0.8)=0, (0.1, 0.3)=0,
    so AUROC = 3.5 / 6 = 7/12. By ranks: ascending ranks 0.1->1, 0.3->2, 0.8,0.8->3.5, 0.9->5;
    R+ = 5 + 3.5 + 1 = 9.5, U = 9.5 - 3·4/2 = 3.5, U / (3·2) = 7/12.
    """
    scores = [0.9, 0.8, 0.8, 0.3, 0.1]
    labels = [1, 0, 1, 0, 1]
    assert auroc(scores, labels) == pytest.approx(7 / 12)
    assert naive_auroc(scores, labels) == pytest.approx(7 / 12)
    assert auroc([1.0, 2.0, 3.0], [0, 1, 1]) == 1.0
    assert auroc([1.0, 2.0, 3.0], [1, 0, 0]) == 0.0
    assert auroc([5.0, 5.0, 5.0, 5.0], [1, 0, 1, 0]) == 0.5


def test_auroc_matches_naive_pair_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = int(rng.integers(2, 60))
        scores = np.round(rng.normal(size=n), 1)  # rounding makes ties
        labels = rng.random(n) < 0.4
        labels[0], labels[1] = True, False
        assert auroc(scores, labels) == pytest.approx(naive_auroc(scores, labels), abs=1e-12)


def test_auroc_undefined_and_nan():
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    with pytest.raises(NonFiniteError):
        auroc([float("nan"), 0.2], [1, 0])


def test_precision_at_k_hand_computed_with_tie_at_boundary():
    """Same scores/labels as the AUROC example; sorted: 0.9(+) 0.8(-) 0.8(+) 0.3(-) 0.1(+).

    k=1: {0.9} -> 1. k=2: 0.9(+) then one of the tied 0.8s (1 positive of 2) -> (1 + ½) / 2 = 0.75.
    k=3: 0.9 and both 0.8s -> 2/3. k=5: 3/5.
    """
    scores = [0.9, 0.8, 0.8, 0.3, 0.1]
    labels = [1, 0, 1, 0, 1]
    assert precision_at_k(scores, labels, 1) == 1.0
    assert precision_at_k(scores, labels, 2) == pytest.approx(0.75)
    assert precision_at_k(scores, labels, 3) == pytest.approx(2 / 3)
    assert precision_at_k(scores, labels, 5) == pytest.approx(3 / 5)
    # A constant scorer gets the base rate whatever the order.
    assert precision_at_k([0.0] * 4, [1, 0, 0, 0], 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        precision_at_k(scores, labels, 0)


def test_token_credit_excludes_neutral_tokens_and_pools_responses():
    """Credit [[1, 0, -1], [0.5, -0.2]]: positives 1, 0.5; negatives -1, -0.2; the 0 is neutral.

    Scores at the kept tokens: pos {0.9, 0.1}, neg {-0.5, 0.3}: pairs 0.9>-0.5, 0.9>0.3, 0.1>-0.5,
    0.1<0.3 -> AUROC 3/4. k defaults to n_pos = 2: top-2 scores 0.9(+), 0.3(-) -> P@2 = 1/2.
    The neutral token's score (100) would top the ranking if it were counted.
    """
    scores = [[0.9, 100.0, -0.5], [0.1, 0.3]]
    credit = [[1.0, 0.0, -1.0], [0.5, -0.2]]
    res = evaluate_token_credit(scores, credit)
    assert res.auroc == pytest.approx(0.75)
    assert res.precision_at_k == pytest.approx(0.5)
    assert (res.k, res.n_pos, res.n_neg, res.n_neutral) == (2, 2, 2, 1)
    # Padded (N, T) layout with a mask gives the same result.
    s2 = torch.tensor([[0.9, 100.0, -0.5], [0.1, 0.3, 7.0]])
    c2 = torch.tensor([[1.0, 0.0, -1.0], [0.5, -0.2, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert evaluate_token_credit(s2, c2, response_mask=mask) == res
    assert evaluate_token_credit(scores, credit, k=1).precision_at_k == 1.0


def test_token_credit_matches_naive_on_random_data():
    rng = np.random.default_rng(1)
    credit = [np.round(rng.normal(size=int(rng.integers(1, 9))), 1) for _ in range(20)]
    scores = [c + rng.normal(scale=1.0, size=c.size) for c in credit]
    res = evaluate_token_credit(scores, credit, eps=0.05)
    c, s = np.concatenate(credit), np.concatenate(scores)
    keep = np.abs(c) > 0.05
    assert res.auroc == pytest.approx(naive_auroc(s[keep], c[keep] > 0))
    order = np.argsort(-s[keep])
    assert res.precision_at_k == pytest.approx((c[keep][order][: res.k] > 0).mean())


def test_token_credit_length_mismatch_names_the_row():
    with pytest.raises(DataError, match="row 2"):
        evaluate_token_credit([[1.0], [1.0, 2.0]], [[1.0], [1.0]])


def test_entropy_uniform_and_one_hot():
    """Uniform over V=4: H = log 4. One-hot (other logits -inf or very negative): H = 0."""
    v = 4
    logits = torch.zeros(3, 2, v)
    logits[1] = -float("inf")
    logits[1, :, 2] = 0.0  # one-hot with -inf elsewhere
    logits[2] = -50.0
    logits[2, :, 0] = 50.0  # one-hot up to exp(-100)
    ent = response_entropy(logits.requires_grad_(), torch.ones(3, 2), chunk_size=1)
    assert ent.shape == (3,)
    torch.testing.assert_close(ent, torch.tensor([math.log(v), 0.0, 0.0]), atol=1e-6, rtol=0)
    assert not ent.requires_grad


def test_entropy_masked_mean_per_response_then_mean():
    """Response 0: tokens uniform over 4 (log 4), uniform over 2 (log 2; masked out), mean log 4.
    Response 1: one token uniform over 2 -> log 2. Response 2: empty, left out.
    Mean over responses: (log 4 + log 2) / 2 = 1.5 log 2.
    """
    neg = -float("inf")
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, neg, neg]],
            [[0.0, 0.0, neg, neg], [0.0, 0.0, 0.0, 0.0]],
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    mask = torch.tensor([[1, 0], [1, 0], [0, 0]])
    torch.testing.assert_close(response_entropy(logits, mask), torch.tensor([math.log(4), math.log(2), 0.0]))
    assert mean_token_entropy(logits, mask) == pytest.approx(1.5 * math.log(2))
    assert math.isnan(mean_token_entropy(logits, torch.zeros(3, 2)))


def test_distinct_n_tiny_example():
    """[a b a b] and [a b c]. Unigrams a b a b a b c: 3 distinct of 7.
    Bigrams ab ba ab | ab bc: {ab, ba, bc} = 3 of 5. 4-grams: one (abab) of 1. 5-grams: none -> 0.
    """
    seqs = [["a", "b", "a", "b"], ["a", "b", "c"]]
    assert distinct_n(seqs, 1) == pytest.approx(3 / 7)
    assert distinct_n(seqs, 2) == pytest.approx(3 / 5)
    assert distinct_n(seqs, 4) == 1.0
    assert distinct_n(seqs, 5) == 0.0
    assert distinct_n([torch.tensor([1, 2, 1, 2]), [1, 2, 3]], 2) == pytest.approx(3 / 5)


def test_sequential_kl_and_length():
    """Sum of per-token KL over response tokens: [0.1 + 0.2, 0.5]; masked NaN/inf are ignored."""
    token_kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(sequential_kl(token_kl, mask), torch.tensor([0.3, 0.5]))
    assert response_length(mask).tolist() == [2, 1]


def test_sequential_kl_of_exact_token_kl_is_kl_of_sequences():
    """Chain rule on a two-step model with context-dependent next-token distributions, enumerated naively."""
    g = torch.Generator().manual_seed(0)
    v = 3
    pol_first, ref_first = (
        torch.randn(v, generator=g).log_softmax(-1),
        torch.randn(v, generator=g).log_softmax(-1),
    )
    pol_second = torch.randn(v, v, generator=g).log_softmax(-1)  # [first token, next token]
    ref_second = torch.randn(v, v, generator=g).log_softmax(-1)
    naive = sum(
        (pol_first[a] + pol_second[a, b]).exp()
        * (pol_first[a] + pol_second[a, b] - ref_first[a] - ref_second[a, b])
        for a in range(v)
        for b in range(v)
    )

    def kl(lp, lq):
        return (lp.exp() * (lp - lq)).sum(-1)

    # Expected sequential KL over samples y ~ policy = Σ_a π(a) · (KL_1 + KL_2(a)).
    token_kl = torch.stack([kl(pol_first, ref_first).expand(v), kl(pol_second, ref_second)], dim=-1)  # (v, 2)
    seq = sequential_kl(token_kl, torch.ones(v, 2))
    torch.testing.assert_close((pol_first.exp() * seq).sum(), naive)
