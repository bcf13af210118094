"""The report's entries as `workbench compare` sees them: families of points and their fronts.

The plot draws each family's Pareto front and the table above it gives compare's verdicts; if the
two grouped or oriented points differently, a curve could contradict the verdict printed over it.
So the grouping (`points.families`), the directions (`points.direction`, `points.to_points`
negating a higher-is-better metric into a cost), the front (`frontier.pareto_front`) and the
seed mean (`frontier.front_at`) all come from workbench.compare; this module only adapts a
ReportEntry to the point compare sees and turns costs back into each metric's units.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.compare import points as pts
from workbench.compare.analysis import in_units
from workbench.compare.frontier import front_at, pareto_front
from workbench.report.plots import ReportEntry

DEFAULT_REFERENCE = pts.DEFAULT_REFERENCE  # "baseline": the unregularized recipe, trained less


def as_point(entry: ReportEntry) -> pts.Entry:
    """The entry under its display name, which the plot's fronts list their members by."""
    return entry.entry.model_copy(update={"name": entry.name})


def grouped(entries: list[ReportEntry], *metrics: str) -> dict[str, dict[int, list[pts.Entry]]]:
    """family -> seed -> entries, of the entries that carry every one of `metrics` (finite): an
    entry without a coordinate is no point on that plane."""
    points = [p for p in map(as_point, entries) if all(pts.reading(p, m) is not None for m in metrics)]
    return pts.families(points)


@dataclass(frozen=True)
class Front:
    """One family's front on a (learning, forgetting) plane, in the metrics' own units."""

    curve: list[tuple[float, float]]   # (learning, forgetting), best learning first
    members: set[str]                  # names of the entries on some seed's front


def family_front(seeds: dict[int, list[pts.Entry]], learning: str, forgetting: str) -> Front:
    """The family's front as compare reads it. One seed: its Pareto front's vertices. Several:
    the mean over seeds (`front_at`) at every vertex x of any seed's front where all seeds reach,
    since a mean over fewer seeds would jump with which seeds reach an x."""
    lh, fh = pts.direction(learning, "learning axis"), pts.direction(forgetting, "forgetting axis")
    seeds = pts.with_base_point({"family": seeds}, [learning, forgetting])["family"]  # as compare does
    fronts = [pareto_front(pts.to_points(m, learning, lh, forgetting, fh)) for m in seeds.values()]
    curve = []
    for x in sorted({p.x for f in fronts for p in f}):
        estimate = front_at(fronts, x)
        if estimate is not None:
            curve.append((in_units(x, lh), in_units(estimate.value, fh)))
    return Front(curve, {p.label for f in fronts for p in f})
