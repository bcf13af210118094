"""The maths of comparing at matched learning: small pure functions over floats, no I/O.

Both axes are costs, lower is better. A point's learning cost `x` is the learning metric, negated
when the catalogue says higher is better (exact match); its forgetting cost `y` is the forgetting
metric, negated likewise (an accuracy delta). `workbench.compare.points` does the negation, so
everything here reads "lower is better" on both axes and "forgets less" means a smaller `y`.

Uncertainty here is the fallback, for results files without per-item scores (schema 1) or
metrics that have none; with them, workbench.compare.paired resamples the items instead and uses
`pareto_front`, `interpolate` and `matched_levels` on every replicate. Without items there is one
95% CI per metric (a paired bootstrap, base vs tuned, within one entry). Each CI is read as a
normal one,

    se = (hi - lo) / (2 * 1.96),

and a value with no CI has se 0, which the rows flag (`value_only`) rather than hide. Points are
treated as independent: two recipes scored on the same items are positively correlated, so the
variance of their difference is overstated (the CI is conservative, never optimistic); the front
is chosen on point estimates, and the noise in which points make it is not propagated.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Z95 = 1.96  # the normal quantile both ways: reading a CI into an se, and an se back into a CI
Verdict = Literal["helps", "no different", "worse"]


@dataclass(frozen=True)
class Point:
    """One evaluated entry on the (learning cost, forgetting cost) plane, with standard errors."""

    x: float            # learning cost: lower is better
    y: float            # forgetting cost: lower is better (forgets less)
    sx: float = 0.0     # se of x, from its CI; 0 when the metric had none
    sy: float = 0.0     # se of y
    label: str = ""     # the entry name, for messages and the JSON
    value_only: bool = False  # x or y came without a CI: its se of 0 is assumed, not measured


@dataclass(frozen=True)
class Estimate:
    """Forgetting cost at one learning level: a value and its variance."""

    value: float
    var: float
    value_only: bool = False  # rests on a point without a CI
    n_seeds: int = 1

    @property
    def se(self) -> float:
        return math.sqrt(self.var)


@dataclass(frozen=True)
class Difference:
    """family - reference in forgetting cost at one level, with a normal 95% CI and its verdict."""

    value: float
    se: float
    lo: float
    hi: float
    verdict: Verdict


def se_from_ci(lo: float, hi: float) -> float:
    """The normal se a 95% CI implies: se = (hi - lo) / (2 * 1.96). A percentile bootstrap CI
    may be asymmetric (a perplexity ratio); its width is what is kept, not its skew."""
    return max(0.0, (hi - lo) / (2 * Z95))


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The non-dominated subset, sorted by learning cost x ascending (best learning first).

    p is dominated when some q has x_q <= x_p and y_q <= y_p and differs in one of them. After
    sorting by (x, y), every possible q comes before p, so p survives iff y_p < min y before it:
    along the front x rises and y strictly falls. Exact duplicates keep their first copy.
    """
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.x, p.y)):
        if not front or p.y < front[-1].y:
            front.append(p)
    return front


def interpolate(front: Sequence[Point], level: float) -> Estimate | None:
    """Forgetting cost at learning cost `level` on the polyline through the front's points; None
    outside [x_0, x_last] (never extrapolated: a recipe says nothing about learning it never
    reached). `front` is sorted by x with distinct x, as `pareto_front` returns it.

    On the segment a = (x_i, y_i), b = (x_{i+1}, y_{i+1}) with d = x_{i+1} - x_i:

        w = (level - x_i) / d,   s = (y_{i+1} - y_i) / d   (the slope)
        y(level) = (1 - w) * y_i + w * y_{i+1}
        var = (1 - w)^2 * (sy_i^2 + s^2 sx_i^2) + w^2 * (sy_{i+1}^2 + s^2 sx_{i+1}^2)

    The sy terms carry each point's forgetting error through the weights. The s^2 sx^2 terms
    are the delta method for the learning error: dy/dx_i = -s (1 - w) and dy/dx_{i+1} = -s w, so
    a point measured to have learned a little more or less moves the polyline by slope times
    that. x and y of one point come from different data (target vs general text) and are taken
    as independent.
    """
    if not front or not front[0].x <= level <= front[-1].x:
        return None
    if len(front) == 1:  # a one-point front is defined at its own x only
        p = front[0]
        return Estimate(p.y, p.sy ** 2, p.value_only)
    xs = [p.x for p in front]
    i = min(bisect.bisect_right(xs, level) - 1, len(front) - 2)  # level == x_last: last segment
    a, b = front[i], front[i + 1]
    d = b.x - a.x
    w = (level - a.x) / d
    s = (b.y - a.y) / d
    value = (1 - w) * a.y + w * b.y
    var = (1 - w) ** 2 * (a.sy ** 2 + s ** 2 * a.sx ** 2) + w ** 2 * (b.sy ** 2 + s ** 2 * b.sx ** 2)
    return Estimate(value, var, a.value_only or b.value_only)


def overlap(*ranges: tuple[float, float]) -> tuple[float, float] | None:
    """The intersection of closed ranges [lo, hi], or None when it is empty."""
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return (lo, hi) if lo <= hi else None


def matched_levels(reference: tuple[float, float], family: tuple[float, float], n: int) -> list[float]:
    """n learning costs evenly spaced over where the two ranges overlap, ends included, ordered
    from the least learning (highest x) to the most; [] when they do not overlap, [x] when they
    touch at one x. Both ends are points' own x, so every level lies inside both spans."""
    both = overlap(reference, family)
    if both is None:
        return []
    lo, hi = both
    if lo == hi:
        return [lo]
    levels = np.linspace(hi, lo, n)  # numpy puts the last value exactly on `lo`
    return [float(x) for x in levels]


def combine_seeds(estimates: Sequence[Estimate]) -> Estimate:
    """The mean over seeds of per-seed estimates y_s (each with item variance v_s) and the
    variance of that mean from a two-level decomposition, y_s = mu + u_s + e_s with seed effect
    u_s ~ (0, sigma^2) and item error e_s ~ (0, v_s):

        mean = (1/n) sum_s y_s
        v    = (1/n) sum_s v_s                         (mean item variance)
        sigma^2 = max(0, S^2 - v),  S^2 = sum_s (y_s - mean)^2 / (n - 1)
        var  = v / n + sigma^2 / n                     ( = max(S^2, v) / n )

    The sample variance S^2 already contains the item noise (E[S^2] = sigma^2 + v), so the
    seed part is S^2 less v, floored at 0; adding S^2 itself would count the items twice. With
    one seed, var = v_1. Approximate: the item variances are themselves read from CIs (see the
    module docstring), and the CI built on this uses the normal quantile although S^2 has only
    n - 1 degrees of freedom (a t quantile would be wider with few seeds).
    """
    n = len(estimates)
    ys = np.array([e.value for e in estimates], dtype=float)
    item = float(np.mean([e.var for e in estimates]))
    seed = max(0.0, float(np.var(ys, ddof=1)) - item) if n > 1 else 0.0
    return Estimate(float(ys.mean()), item / n + seed / n,
                    any(e.value_only for e in estimates), n)


def front_at(fronts: Sequence[Sequence[Point]], level: float) -> Estimate | None:
    """One family's forgetting at a level from its per-seed fronts: None unless every seed's
    front reaches the level (a mean over fewer seeds would shift with which seeds reach it)."""
    found = [interpolate(front, level) for front in fronts]
    if not found or any(e is None for e in found):
        return None
    return combine_seeds(found)


def verdict(lo: float, hi: float) -> Verdict:
    """'helps' when the CI of family - reference lies below 0 (forgets less), 'worse' above 0,
    else 'no different'. A zero-width CI at 0 (both sides the base) is 'no different'."""
    return "helps" if hi < 0 else "worse" if lo > 0 else "no different"


def difference(family: Estimate, reference: Estimate, z: float = Z95) -> Difference:
    """family - reference with var = var_f + var_r (independent: conservative, see the module
    docstring) and CI = d -+ z * se."""
    d = family.value - reference.value
    se = math.sqrt(family.var + reference.var)
    lo, hi = d - z * se, d + z * se
    return Difference(d, se, lo, hi, verdict(lo, hi))


def summarise(verdicts: Sequence[str | None]) -> tuple[str, str]:
    """(label, text) for one family and metric over levels L1..Ln (None: not compared there).

    label: 'helps' when some level helps and none is worse, 'worse' the other way round, 'mixed'
    when both occur, else 'no different', or 'no comparison' when no level was compared. Levels
    that are no different do not dilute the label: near the base both fronts meet (at scale 0
    they are the same model), so L1 is often no different for any recipe. text says where:
    'helps at L3..L5; worse at L1'."""
    if all(v is None for v in verdicts):
        return "no comparison", "no comparison (the fronts share no learning level)"
    runs: list[tuple[str, int, int]] = []  # (verdict, first, last), 1-based and consecutive
    for i, v in enumerate(verdicts, start=1):
        if v in ("helps", "worse"):
            if runs and runs[-1][0] == v and runs[-1][2] == i - 1:
                runs[-1] = (v, runs[-1][1], i)
            else:
                runs.append((v, i, i))
    kinds = {v for v, _, _ in runs}
    if not kinds:
        return "no different", "no different at any level"
    label = "mixed" if len(kinds) == 2 else kinds.pop()
    return label, "; ".join(f"{v} at L{a}" + (f"..L{b}" if b > a else "") for v, a, b in runs)
