"""The maths of workbench.compare.frontier on hand-computed cases: lower is better on both axes."""

import math

import pytest

from workbench.compare.frontier import (Estimate, Point, combine_seeds, difference, front_at,
                                        interpolate, matched_levels, pareto_front, se_from_ci,
                                        summarise, verdict)


def xy(points):
    return [(p.x, p.y) for p in points]


def test_a_cloud_reduces_to_its_pareto_set():
    cloud = [Point(x, y) for x, y in [(1, 5), (2, 3), (3, 4), (4, 1), (2, 6), (5, 1), (3, 2), (1.5, 5), (2, 3)]]
    # (1.5, 5) and (2, 6) are dominated by (1, 5); (3, 4) by (2, 3); (5, 1) by (4, 1); the second (2, 3)
    # is a duplicate
    assert xy(pareto_front(cloud)) == [(1, 5), (2, 3), (3, 2), (4, 1)]
    front = pareto_front(cloud)
    for p in front:  # and none of those is dominated by any point of the cloud
        assert not any(q.x <= p.x and q.y <= p.y and (q.x, q.y) != (p.x, p.y) for q in cloud)


def test_pareto_front_of_one_point_and_of_none():
    assert xy(pareto_front([Point(1, 1)])) == [(1, 1)]
    assert pareto_front([]) == []


POLYLINE = [Point(1, 5), Point(2, 3), Point(4, 1)]


@pytest.mark.parametrize("level, expected", [
    (1.0, 5.0), (1.5, 4.0), (2.0, 3.0), (3.0, 2.0), (3.5, 1.5), (4.0, 1.0),
])
def test_interpolation_on_a_known_polyline(level, expected):
    assert interpolate(POLYLINE, level).value == pytest.approx(expected)


@pytest.mark.parametrize("level", [0.999, 4.001, -10.0, 100.0])
def test_no_value_outside_the_front(level):
    assert interpolate(POLYLINE, level) is None


def test_a_one_point_front_is_defined_at_its_own_learning_only():
    assert interpolate([Point(2, 3, sy=0.1)], 2.0).var == pytest.approx(0.01)
    assert interpolate([Point(2, 3)], 2.1) is None


def test_the_variance_goes_through_the_weights_and_the_slope():
    """a = (0, 1), b = (2, 3): slope s = 1; at 0.5, w = 0.25.
    forgetting only: 0.75^2 * 0.1^2 + 0.25^2 * 0.2^2 = 0.005625 + 0.0025 = 0.008125;
    adding a's learning se 0.1: + 0.75^2 * 1^2 * 0.1^2 = 0.005625, total 0.01375."""
    a, b = Point(0, 1, sy=0.1), Point(2, 3, sy=0.2)
    assert interpolate([a, b], 0.5).value == pytest.approx(1.5)
    assert interpolate([a, b], 0.5).var == pytest.approx(0.008125)
    a = Point(0, 1, sx=0.1, sy=0.1)
    assert interpolate([a, b], 0.5).var == pytest.approx(0.01375)


def test_value_only_points_have_se_zero_and_say_so():
    est = interpolate([Point(0, 1, value_only=True), Point(1, 0)], 0.5)
    assert est.var == 0 and est.value_only
    assert not interpolate([Point(0, 1), Point(1, 0)], 0.5).value_only


def test_se_from_a_ci():
    assert se_from_ci(0.9, 1.1) == pytest.approx(0.2 / 3.92)


def test_matched_levels_span_the_overlap_least_learning_first():
    assert matched_levels((1.0, 3.0), (2.0, 5.0), 3) == pytest.approx([3.0, 2.5, 2.0])
    assert matched_levels((1.0, 2.0), (1.0, 2.0), 5) == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0])
    assert matched_levels((1.0, 2.0), (2.5, 3.0), 5) == []   # no overlap: nothing compared
    assert matched_levels((1.0, 2.0), (2.0, 3.0), 5) == [2.0]  # touching at one learning


def test_one_seed_keeps_its_item_variance():
    assert combine_seeds([Estimate(0.3, 1e-4)]) == Estimate(0.3, 1e-4, False, 1)


def test_two_seeds_the_seed_variance_widens_the_ci():
    """y = 0.2 and 0.4, item variance 1e-4 each: S^2 = (0.1^2 + 0.1^2) / 1 = 0.02, seed part
    0.02 - 1e-4 = 0.0199, var = 1e-4 / 2 + 0.0199 / 2 = 0.01, se 0.1. Two seeds that agree
    (0.3 and 0.3) keep only the items: var = 1e-4 / 2, se 0.00707."""
    spread = combine_seeds([Estimate(0.2, 1e-4), Estimate(0.4, 1e-4)])
    agree = combine_seeds([Estimate(0.3, 1e-4), Estimate(0.3, 1e-4)])
    assert spread.value == pytest.approx(0.3) and spread.n_seeds == 2
    assert spread.var == pytest.approx(0.01) and spread.se == pytest.approx(0.1)
    assert agree.var == pytest.approx(5e-5)
    reference = Estimate(0.35, 1e-4)
    wide, narrow = difference(spread, reference), difference(agree, reference)
    assert wide.hi - wide.lo == pytest.approx(2 * 1.96 * math.sqrt(0.01 + 1e-4))
    assert narrow.verdict == "helps" and wide.verdict == "no different"  # same mean, wider CI


def test_seed_noise_smaller_than_the_item_noise_adds_nothing():
    """S^2 = 0.00005 < v = 1e-4: the seeds' spread is what the items alone would give."""
    est = combine_seeds([Estimate(0.3, 1e-4), Estimate(0.31, 1e-4)])
    assert est.var == pytest.approx(1e-4 / 2)


def test_a_level_counts_only_where_every_seed_reaches_it():
    seeds = [[Point(1, 2), Point(3, 0)], [Point(2, 1), Point(3, 0)]]
    assert front_at(seeds, 1.5) is None  # the second seed starts at 2
    assert front_at(seeds, 2.5).value == pytest.approx((0.5 + 0.5) / 2)


def test_a_shifted_front_helps_and_an_identical_one_does_not():
    ref = [Point(1, 0.2, sy=0.001), Point(2, 0.0, sy=0.001)]
    shifted = [Point(p.x, p.y - 0.1, sy=0.001) for p in ref]
    d = difference(interpolate(shifted, 1.5), interpolate(ref, 1.5))
    assert d.value == pytest.approx(-0.1) and d.hi < 0 and d.verdict == "helps"
    same = difference(interpolate(ref, 1.5), interpolate(ref, 1.5))
    assert same.value == 0 and same.lo < 0 < same.hi and same.verdict == "no different"


def test_verdicts_need_the_whole_ci_on_one_side():
    assert verdict(-0.3, -0.01) == "helps"
    assert verdict(0.01, 0.3) == "worse"
    assert verdict(-0.1, 0.1) == "no different"
    assert verdict(0.0, 0.0) == "no different"  # the base against the base: equal, not better


@pytest.mark.parametrize("verdicts, label, text", [
    (["helps"] * 3, "helps", "helps at L1..L3"),
    ([None, "no different", "helps", "helps", "helps"], "helps", "helps at L3..L5"),
    (["worse", "no different", "helps"], "mixed", "worse at L1; helps at L3"),
    (["helps", "worse", "helps"], "mixed", "helps at L1; worse at L2; helps at L3"),
    (["no different", None], "no different", "no different at any level"),
    ([None, None], "no comparison", "no comparison (the fronts share no learning level)"),
    ([], "no comparison", "no comparison (the fronts share no learning level)"),
    ([None, "worse", "worse"], "worse", "worse at L2..L3"),
])
def test_a_family_verdict_summarises_its_levels(verdicts, label, text):
    assert summarise(verdicts) == (label, text)
