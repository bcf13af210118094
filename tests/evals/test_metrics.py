import math

import numpy as np
import pytest

from workbench.evals.metrics import (
    brier_score, ece, exact_match_rate, extraction_rate, membership_scores, min_k_prob, paired_bootstrap_ci,
    ratio_bootstrap_ci, reliability_bins, roc_auc, roc_curve, tpr_at_fpr
)


def pairwise_auc(pos, neg):
    """Reference: count every (positive, negative) pair, ties as half."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)


def trapezoid(x, y):
    return float((np.diff(x) * (y[1:] + y[:-1]) / 2).sum())


# --- membership inference ------------------------------------------------------------------


def test_auc_hand_case():
    # pairs (pos > neg): 0.9>0.7, 0.9>0.3, 0.8>0.7, 0.8>0.3, 0.4>0.3; 0.4<0.7 -> 5 of 6
    assert roc_auc([0.9, 0.8, 0.4], [0.7, 0.3]) == pytest.approx(5 / 6)


def test_auc_tie_gets_half_credit():
    # 0.9 beats both (2); 0.7 ties 0.7 (0.5) and beats 0.3 (1); 0.4 beats 0.3 (1) -> 4.5 / 6
    assert roc_auc([0.9, 0.7, 0.4], [0.7, 0.3]) == pytest.approx(0.75)
    assert roc_auc([1.0, 1.0], [1.0]) == 0.5  # all tied


def test_auc_extremes_and_chance():
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    rng = np.random.default_rng(0)
    assert roc_auc(rng.normal(size=4000), rng.normal(size=4000)) == pytest.approx(0.5, abs=0.02)


def test_auc_matches_pairwise_count_and_roc_area():
    rng = np.random.default_rng(1)
    pos, neg = rng.integers(0, 8, 60), rng.integers(0, 6, 45)  # many ties across classes
    auc = roc_auc(pos, neg)
    assert auc == pytest.approx(pairwise_auc(pos, neg))
    fpr, tpr = roc_curve(pos, neg)
    assert trapezoid(fpr, tpr) == pytest.approx(auc)


def test_roc_curve_hand_case():
    # thresholds 0.9, 0.8, 0.7, 0.4, 0.3 ("member iff score >= t"):
    # TP 1,2,2,3,3 of 3; FP 0,0,1,1,2 of 2
    fpr, tpr = roc_curve([0.9, 0.8, 0.4], [0.7, 0.3])
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    # a tie is one point (both classes enter together), not two
    fpr, tpr = roc_curve([0.7], [0.7])
    np.testing.assert_allclose(fpr, [0, 1])
    np.testing.assert_allclose(tpr, [0, 1])


def test_tpr_at_fpr_hand_case():
    neg = np.arange(100)  # 0..99: FPR 1% allows exactly one negative (99) at or above threshold
    pos = [150, 120, 99.5, 98.5, 50]
    # t=99.5: FP 0, TP 3; t=99: FP 1, TP 3; t=98.5: FP 1 (only 99), TP 4; t=98: FP 2 -> stop
    assert tpr_at_fpr(pos, neg, max_fpr=0.01) == pytest.approx(4 / 5)
    assert tpr_at_fpr(pos, neg, max_fpr=0.0) == pytest.approx(3 / 5)
    assert tpr_at_fpr(pos, neg, max_fpr=1.0) == 1.0
    assert tpr_at_fpr([0.0], [1.0], max_fpr=0.5) == 0.0  # only (0, 0) qualifies


def test_empty_side_and_nan_raise():
    with pytest.raises(ValueError):
        roc_auc([], [1.0])
    with pytest.raises(ValueError):
        roc_auc([1.0], [])
    with pytest.raises(ValueError):
        roc_curve([np.nan], [1.0])
    with pytest.raises(ValueError):
        tpr_at_fpr([1.0], [0.0], max_fpr=1.5)


def test_min_k_prob_hand_case():
    lp = [-0.1, -2.0, -0.5, -3.0, -0.2]
    assert min_k_prob(lp, k=0.4) == pytest.approx(-2.5)  # ceil(2.0)=2 lowest: (-3 - 2) / 2
    assert min_k_prob(lp, k=0.3) == pytest.approx(-2.5)  # ceil(1.5)=2
    assert min_k_prob(lp, k=0.2) == pytest.approx(-3.0)  # ceil(1.0)=1
    assert min_k_prob(lp, k=0.01) == pytest.approx(-3.0)  # at least one token
    assert min_k_prob(lp, k=1.0) == pytest.approx(-5.8 / 5)  # all: mean
    # 0.07 * 100 is 7.000000000000001 in floats: still 7 tokens, (-1 - ... - 7) / 7 = -4 (not -28 / 8)
    assert min_k_prob([-float(i) for i in range(1, 8)] + [0.0] * 93, k=0.07) == pytest.approx(-4.0)
    with pytest.raises(ValueError):
        min_k_prob([], k=0.2)


def test_membership_scores_sign_conventions():
    # example 0 is the member: lower loss, lower loss relative to base, fewer surprising tokens
    loss, base_loss = np.array([0.5, 2.0]), np.array([2.0, 2.0])
    logprobs = [np.array([-0.1, -0.2, -0.3]), np.array([-0.1, -4.0, -3.0])]
    scores = membership_scores(loss, base_loss, logprobs, k=0.34)  # ceil(1.02) = 2 tokens
    np.testing.assert_allclose(scores["loss"], [-0.5, -2.0])
    np.testing.assert_allclose(scores["loss_ratio"], [-0.25, -1.0])
    np.testing.assert_allclose(scores["min_k"], [-0.25, -3.5])
    for values in scores.values():
        assert values[0] > values[1]
        assert roc_auc(values[:1], values[1:]) == 1.0


def test_membership_scores_only_given_inputs():
    assert set(membership_scores([1.0, 2.0])) == {"loss"}
    assert set(membership_scores([1.0], base_loss=[2.0])) == {"loss", "loss_ratio"}
    with pytest.raises(ValueError):
        membership_scores([1.0, 2.0], base_loss=[1.0])
    with pytest.raises(ValueError):
        membership_scores([1.0, 2.0], token_logprobs=[[-1.0]])


# --- calibration ---------------------------------------------------------------------------


def test_ece_hand_case_equal_width():
    conf, correct = [0.1, 0.2, 0.3, 0.9], [0, 1, 0, 1]
    # bins [0, 0.5): {0.1, 0.2, 0.3} conf 0.2, acc 1/3 -> 3/4 * 2/15 = 0.1
    #      [0.5, 1]: {0.9}           conf 0.9, acc 1   -> 1/4 * 0.1  = 0.025
    assert ece(conf, correct, n_bins=2) == pytest.approx(0.125)


def test_ece_hand_case_adaptive():
    conf, correct = [0.9, 0.1, 0.3, 0.2], [1, 0, 0, 1]  # unsorted on purpose
    # sorted 0.1, 0.2, 0.3, 0.9 split 2 + 2:
    # {0.1, 0.2} conf 0.15, acc 1/2 -> 2/4 * 0.35 = 0.175
    # {0.3, 0.9} conf 0.6,  acc 1/2 -> 2/4 * 0.1  = 0.05
    assert ece(conf, correct, n_bins=2, scheme="adaptive") == pytest.approx(0.225)
    bins = reliability_bins(conf, correct, n_bins=2, scheme="adaptive")
    assert [(b["lo"], b["hi"], b["count"]) for b in bins] == [(0.1, 0.2, 2), (0.3, 0.9, 2)]


def test_reliability_bins_edges():
    # 0.5 opens the upper bin; 1.0 is in the last bin (closed); 0.0 in the first
    bins = reliability_bins([0.0, 0.5, 1.0], [1, 1, 0], n_bins=2)
    assert [(b["lo"], b["hi"], b["count"]) for b in bins] == [(0.0, 0.5, 1), (0.5, 1.0, 2)]
    assert bins[1]["accuracy"] == 0.5 and bins[1]["confidence"] == 0.75
    # an edge that floor(conf * n_bins) would misplace: 1/49 * 49 < 1 in floats
    edge = np.linspace(0, 1, 50)[1]
    assert reliability_bins([edge], [1], n_bins=49)[1]["count"] == 1


def test_reliability_bins_counts_and_empty_bins():
    rng = np.random.default_rng(2)
    conf = rng.uniform(0.6, 1.0, 101)  # nothing below 0.6: empty low bins
    correct = rng.uniform(size=101) < conf
    for scheme in ("equal_width", "adaptive"):
        bins = reliability_bins(conf, correct, n_bins=15, scheme=scheme)
        assert len(bins) == 15 and sum(b["count"] for b in bins) == 101
    bins = reliability_bins(conf, correct, n_bins=10)
    assert bins[0]["count"] == 0 and math.isnan(bins[0]["accuracy"])
    assert not math.isnan(ece(conf, correct, n_bins=10))  # empty bins contribute 0
    # adaptive with more bins than examples: sizes 1, 1, 0
    sizes = [b["count"] for b in reliability_bins([0.3, 0.7], [1, 0], 3, "adaptive")]
    assert sizes == [1, 1, 0]


def test_ece_perfect_calibration_near_zero():
    rng = np.random.default_rng(3)
    conf = rng.uniform(size=100_000)
    correct = rng.uniform(size=conf.size) < conf  # right with probability exactly conf
    assert ece(conf, correct) < 0.01
    assert ece(conf, correct, scheme="adaptive") < 0.01
    assert ece(np.ones(10), np.ones(10)) == 0.0


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError):
        ece([1.2], [1])
    with pytest.raises(ValueError):
        ece([0.5], [1], scheme="quantile")
    with pytest.raises(ValueError):
        ece([0.5, 0.6], [1])


def test_brier_hand_case_ragged():
    probs = [[0.7, 0.2, 0.1], [0.5, 0.5], [0.1, 0.6, 0.2, 0.1]]
    # 0.3^2 + 0.2^2 + 0.1^2 = 0.14; 0.5^2 + 0.5^2 = 0.5; 0.1^2 + 0.4^2 + 0.2^2 + 0.1^2 = 0.22
    assert brier_score(probs, [0, 1, 1]) == pytest.approx((0.14 + 0.5 + 0.22) / 3)


def test_brier_extremes_and_validation():
    assert brier_score([[0.0, 1.0, 0.0], [1.0, 0.0]], [1, 0]) == 0.0
    assert brier_score([[1.0, 0.0]], [1]) == 2.0  # confidently wrong: 1 + 1
    with pytest.raises(ValueError):
        brier_score([[2.0, -1.5]], [0])  # not a distribution (logits?)
    with pytest.raises(ValueError):
        brier_score([[0.5, 0.5]], [2])


# --- generation ----------------------------------------------------------------------------


def test_exact_match_rate():
    preds, refs = [" Paris\n", "paris", "Lyon", "Rome"], ["Paris", "Paris", "Paris", "Rome "]
    assert exact_match_rate(preds, refs) == 0.75  # 1, 2 (case-folded), 4 (stripped)
    assert exact_match_rate(preds, refs, normalize=False) == 0.5  # case now counts
    with pytest.raises(ValueError):
        exact_match_rate(["a"], ["a", "b"])


def test_extraction_rate_planted_strings():
    true = ["the secret is 42", "abc", "foo", "bar"]
    generated = ["the secret is 42",     # exact: counts
                 "abd",                  # one wrong char: no
                 "foo and then more",   # longer, starts with the suffix: counts
                 "xbar"]                # contains it, but not at the start: no
    assert extraction_rate(generated, true) == 0.5
    # token ids work the same way
    assert extraction_rate([[5, 6, 7, 8], np.array([5, 9])], [[5, 6, 7], [5, 6]]) == 0.5
    with pytest.raises(ValueError):
        extraction_rate(["anything"], [""])


# --- base vs tuned -------------------------------------------------------------------------


def test_paired_bootstrap_deterministic():
    rng = np.random.default_rng(4)
    base, tuned = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    first = paired_bootstrap_ci(base, tuned, n_boot=200, seed=7)
    assert first == paired_bootstrap_ci(base, tuned, n_boot=200, seed=7)
    assert first != paired_bootstrap_ci(base, tuned, n_boot=200, seed=8)


def test_paired_bootstrap_identical_and_shift():
    rng = np.random.default_rng(5)
    base = rng.integers(0, 10, 64).astype(float)
    same = paired_bootstrap_ci(base, base.copy(), n_boot=200)
    assert (same["delta"], same["ci_low"], same["ci_high"], same["n"]) == (0.0, 0.0, 0.0, 64)
    # small integers and n = 64 (a power of two): every mean is exact, so every delta is exactly 1
    shifted = paired_bootstrap_ci(base, base + 1, n_boot=200)
    assert (shifted["delta"], shifted["ci_low"], shifted["ci_high"]) == (1.0, 1.0, 1.0)
    assert shifted["tuned"] == shifted["base"] + 1


def test_paired_bootstrap_ci_contains_delta():
    rng = np.random.default_rng(6)
    base = rng.normal(size=300)
    tuned = base + 0.1 + rng.normal(scale=0.5, size=300)
    out = paired_bootstrap_ci(base, tuned, n_boot=500)
    assert out["delta"] == pytest.approx(tuned.mean() - base.mean())
    assert out["ci_low"] < out["delta"] < out["ci_high"]
    med = paired_bootstrap_ci(base, tuned, stat=np.median, n_boot=300)
    assert med["delta"] == pytest.approx(np.median(tuned) - np.median(base))
    assert med["ci_low"] <= med["ci_high"]


def test_paired_bootstrap_rejects_unpaired():
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0], [1.0], alpha=0.0)


def test_ratio_bootstrap_hand_case():
    # base: (2 + 4) nll over (1 + 3) tokens -> exp(1.5); tuned: (1 + 2) over (1 + 3) -> exp(0.75)
    base, tuned = [[2.0, 1], [4.0, 3]], [[1.0, 1], [2.0, 3]]
    out = ratio_bootstrap_ci(base, tuned, n_boot=100)
    assert out["base"] == pytest.approx(math.exp(1.5))
    assert out["tuned"] == pytest.approx(math.exp(0.75))
    assert out["ratio"] == pytest.approx(math.exp(-0.75))
    assert out["n"] == 2
    # not the mean of per-document perplexities: (e^2 + e^(4/3)) / 2 != e^1.5
    assert out["base"] != pytest.approx((math.exp(2) + math.exp(4 / 3)) / 2)


def test_ratio_bootstrap_identical_and_random():
    rng = np.random.default_rng(7)
    tokens = rng.integers(1, 200, 40)
    base = np.stack([tokens * rng.uniform(1.5, 3.0, 40), tokens], axis=1)
    same = ratio_bootstrap_ci(base, base.copy(), n_boot=200)
    assert (same["ratio"], same["ci_low"], same["ci_high"]) == (1.0, 1.0, 1.0)
    tuned = base.copy()
    tuned[:, 0] *= rng.uniform(1.0, 1.2, 40)  # tuned is worse on every document
    out = ratio_bootstrap_ci(base, tuned, n_boot=300)
    assert out["ratio"] == pytest.approx(out["tuned"] / out["base"])
    assert 1.0 < out["ci_low"] < out["ratio"] < out["ci_high"]
    assert out == ratio_bootstrap_ci(base, tuned, n_boot=300)


def test_ratio_bootstrap_tuned_interval_by_hand():
    """The tuned perplexity's own CI. Two documents of one token each, tuned NLL 1 and 3: a
    resample holds (1, 1), (1, 3) or (3, 3), so its perplexity is e^1, e^2 or e^3, and with 1000
    resamples each end of a 95% interval is one of the extremes (each has probability 1/4)."""
    base, tuned = [[2.0, 1], [2.0, 1]], [[1.0, 1], [3.0, 1]]
    out = ratio_bootstrap_ci(base, tuned, n_boot=1000)
    assert out["tuned"] == pytest.approx(math.exp(2))
    assert (out["tuned_ci_low"], out["tuned_ci_high"]) == pytest.approx((math.exp(1), math.exp(3)))
    # the base is flat, so the ratio's interval is the tuned one over e^2
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((math.exp(-1), math.exp(1)))
    # a tuned side equal on every document has no spread
    flat = ratio_bootstrap_ci(base, [[1.5, 1], [1.5, 1]], n_boot=200)
    assert flat["tuned_ci_low"] == flat["tuned_ci_high"] == pytest.approx(math.exp(1.5))


def test_ratio_bootstrap_validation():
    with pytest.raises(ValueError):
        ratio_bootstrap_ci([1.0, 2.0], [1.0, 2.0])  # not [n, 2]
    with pytest.raises(ValueError):
        ratio_bootstrap_ci([[1.0, 0]], [[1.0, 0]])  # a document without tokens
