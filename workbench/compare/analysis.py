"""Each family against the reference at matched learning: the rows `workbench compare` prints.

For every family other than the reference and every forgetting metric: the per-seed Pareto
fronts of both families, read at the family's matched learning levels (`matched_levels` over
where the two families' learning spans overlap), the difference family - reference with its CI,
and a verdict per level. Everything is computed in cost space (lower is better on both axes,
workbench.compare.frontier) and turned back into each metric's own units only for output.

The CIs: a paired bootstrap over items (workbench.compare.paired) for every metric whose points
all carry per-item scores that reproduce their stated values; else each point's CI read as
independent normal noise (workbench.compare.frontier). Each metric records which it got.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from workbench.compare.frontier import (Difference, Estimate, difference, front_at,
                                        matched_levels, overlap, pareto_front, summarise)
from workbench.compare import points as pts
from workbench.compare.paired import Bootstrap, family_rows
from workbench.errors import UsageError

PAIRED = "paired bootstrap"        # items resampled jointly across entries scored on them
UNPAIRED = "unpaired bootstrap"    # a control: every entry's items resampled on their own
INDEPENDENT = "independent normal"  # each point's stated CI as independent normal noise
METHODS = {"auto": PAIRED, "paired": PAIRED, "unpaired": UNPAIRED, "independent": INDEPENDENT}
REPLICATES = 1000


@dataclass(frozen=True)
class LevelRow:
    """One matched learning level of one family and metric. Estimates are in cost space."""

    level: int                      # 1-based: L1 is the least learning, Ln the most
    learning: float                 # the level in the learning metric's own units
    reference: Estimate | None      # None where the reference's front does not reach the level
    family: Estimate | None         # None where the family's front does not reach it
    diff: Difference | None         # family - reference; None unless both reach the level
    note: str = ""


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    higher: bool                    # the catalogue's direction: is higher better?
    rows: list[LevelRow]
    label: str                      # 'helps', 'worse', 'mixed', 'no different', ...
    text: str                       # 'helps at L2..L5'
    method: str = INDEPENDENT       # how its CIs were made: PAIRED, UNPAIRED or INDEPENDENT


@dataclass(frozen=True)
class FamilyComparison:
    family: str
    seeds: list[int]
    points: int
    span: tuple[float, float] | None   # learning cost every seed spans; None if seeds are disjoint
    levels: list[float]                # learning costs, least learning first
    metrics: list[MetricComparison]


@dataclass
class Comparison:
    inputs: list[Path]
    learning: str
    learning_higher: bool
    reference: str
    reference_seeds: list[int]
    reference_points: int
    reference_span: tuple[float, float] | None
    forgetting: list[tuple[str, bool]]      # (metric, higher is better)
    skipped: list[str]                      # default forgetting metrics some entries lack
    n_levels: int
    families: list[FamilyComparison] = field(default_factory=list)
    replicates: int = 0             # bootstrap replicates (0: no bootstrap was asked for)
    seed: int = 0                   # the bootstrap's seed

    @property
    def methods(self) -> list[str]:
        """The CI methods its metrics used, each once."""
        return list(dict.fromkeys(m.method for f in self.families for m in f.metrics)) or [INDEPENDENT]

    def units(self, cost: float) -> float:
        """A learning cost back in the learning metric's units."""
        return in_units(cost, self.learning_higher)


def in_units(value: float, higher: bool) -> float:
    """A cost back in its metric's units: negated when higher is better (0.0 - x, not -x, so a
    zero prints as 0 rather than -0)."""
    return 0.0 - value if higher else value


def _span(seeds: dict[int, list[pts.Entry]], learning: str, higher: bool) -> tuple[float, float] | None:
    """The learning costs every seed of a family reaches: the intersection of the seeds' spans,
    so each level is backed by all seeds (see frontier.front_at)."""
    return overlap(*(pts.learning_span(m, learning, higher) for m in seeds.values()))


def _fronts(seeds: dict[int, list[pts.Entry]], learning: str, learning_higher: bool,
            metric: str, higher: bool) -> list[list]:
    return [pareto_front(pts.to_points(pts.carrying(m, metric), learning, learning_higher, metric, higher))
            for m in seeds.values()]


def compare_metric(reference_fronts: Sequence[Sequence], family_fronts: Sequence[Sequence],
                   levels: Sequence[float], learning_higher: bool) -> list[LevelRow]:
    """Rows for one metric: both families read at each level; no difference where either front
    does not reach the level (a front is never extrapolated)."""
    rows = []
    for i, level in enumerate(levels, start=1):
        ref, fam = front_at(reference_fronts, level), front_at(family_fronts, level)
        short = [who for who, e in (("the reference's", ref), ("the family's", fam)) if e is None]
        note = ("neither front reaches this learning" if len(short) == 2 else
                f"{short[0]} front does not reach this learning" if short else "")
        rows.append(LevelRow(i, in_units(level, learning_higher), ref, fam,
                             None if short else difference(fam, ref), note))
    return rows


def _learns(seeds: dict[int, list[pts.Entry]], learning: str, higher: bool) -> bool:
    """Whether some point of every seed learns more than the base. A family that never does
    touches the reference only at the base, where both are the base and differ by exactly 0:
    a verdict there would say 'no different' about a recipe that learned nothing."""
    def cost(e: pts.Entry) -> float:
        value = pts.reading(e, learning)[0]
        return -value if higher else value

    for members in seeds.values():
        base = [cost(e) for e in members if e.name == "base"]
        if base and not any(cost(e) < base[0] for e in members if e.name != "base"):
            return False
    return True


# A verdict needs learning to compare at. A family whose points span under a tenth of the
# reference's learning range is judged on a sliver next to the base, where scale-0 noise decides
# (an adapter moving held-out loss 11.72 -> 11.51 read "mixed: helps at L2; worse at L3..L5");
# a reference that moves the learning metric by under 2% of the base's value gives no range at all.
MIN_SPAN_SHARE = 0.1
MIN_REFERENCE_MOVE = 0.02


def _too_little(c: Comparison, span: tuple[float, float]) -> str | None:
    """Why a family or the reference learns too little to compare, or None. The reference's move
    is measured against the larger end of its range (the base's value, when the base is a point)."""
    ref_width, width = c.reference_span[1] - c.reference_span[0], span[1] - span[0]
    start = max(c.reference_span, key=abs)
    if ref_width < MIN_REFERENCE_MOVE * abs(start):
        return (f"no comparison: the reference learns too little to compare (learning moves {ref_width:.3g} from "
                f"{c.units(start):.4g}, under {MIN_REFERENCE_MOVE:.0%})")
    if width < MIN_SPAN_SHARE * ref_width:
        return (f"no comparison: learns too little to compare (a learning span of {width:.3g}, under "
                f"{MIN_SPAN_SHARE:.0%} of the reference's {ref_width:.3g})")
    return None


def _no_levels(c: Comparison, span: tuple[float, float] | None, learns: bool = True) -> str:
    """Why a family has no matched level: its seeds, or the reference's, share no learning
    range, it learns nothing past the base, or the two ranges (shown in the learning metric's
    units) do not overlap."""
    if span is None or c.reference_span is None:
        who = "its seeds" if span is None else "the reference's seeds"
        return f"no comparison: {who} share no learning range"
    def show(r: tuple[float, float]) -> str:
        return "..".join(f"{x:.4g}" for x in sorted(map(c.units, r)))

    if not learns:
        return f"no comparison: no point learns past the base (learning {show(span)})"
    return f"no comparison: learning {show(span)} does not meet the reference's {show(c.reference_span)}"


def compare(paths: Sequence[str | Path], learning: str = pts.DEFAULT_LEARNING,
            forgetting: Sequence[str] | None = None, reference: str | None = None,
            n_levels: int = 5, method: str = "auto", replicates: int = REPLICATES, seed: int = 0) -> Comparison:
    """Read the results files and compare every family with the reference (docs/compare.md).
    Bad input of any kind raises a one-line UsageError naming the file or flag.

    method: "auto" (the paired bootstrap where every point has per-item scores, else independent
    normal CIs), "paired" (the same), "unpaired" (the bootstrap with every entry's items drawn on
    their own: the control that shows what pairing gains) or "independent"."""
    if n_levels < 2:
        raise UsageError(f"--levels: {n_levels}; give 2 or more (the overlap's two ends at least)")
    if method not in METHODS:
        raise UsageError(f"method {method!r}: choose one of {', '.join(METHODS)}")
    if METHODS[method] != INDEPENDENT and replicates < 100:
        raise UsageError(f"replicates: {replicates}; a 95% percentile CI needs 100 or more")
    learning_higher = pts.direction(learning, "--learning")
    wanted = [(m, pts.direction(m, "--forgetting")) for m in dict.fromkeys(forgetting or [])]
    entries = pts.read_entries(paths)
    grouped = pts.families(entries)
    ref_name = pts.pick_reference(grouped, reference, entries)
    if len(grouped) == 1:
        raise UsageError(f"{pts.files(entries)}: only the reference family {ref_name!r}; nothing to compare")
    pts.require(entries, learning, "--learning")
    skipped: list[str] = []
    if wanted:
        for metric, _ in wanted:
            pts.require(pts.full(entries), metric, "--forgetting")
    else:
        used, skipped = pts.default_forgetting(entries)
        wanted = [(m, pts.direction(m, "default forgetting metric")) for m in used]
    pts.check_fronts(grouped)
    grouped = pts.with_base_point(grouped, [learning, *(m for m, _ in wanted)])

    ref_seeds = grouped[ref_name]
    ref_span = _span(ref_seeds, learning, learning_higher)
    boot = None
    if METHODS[method] != INDEPENDENT:
        boot = Bootstrap(grouped, learning, learning_higher, replicates, seed, paired=METHODS[method] == PAIRED)
    result = Comparison([Path(p) for p in paths], learning, learning_higher, ref_name, sorted(ref_seeds),
                        sum(map(len, ref_seeds.values())), ref_span, wanted, skipped, n_levels,
                        replicates=replicates if boot else 0, seed=seed)
    for name, seeds in grouped.items():
        if name != ref_name:
            result.families.append(family_comparison(result, ref_seeds, name, seeds, boot))
    return result


def family_comparison(c: Comparison, ref_seeds: dict[int, list[pts.Entry]], name: str,
                      seeds: dict[int, list[pts.Entry]], boot: Bootstrap | None = None) -> FamilyComparison:
    """One family against the reference on every forgetting metric of `c`, at matched levels; with
    `boot`, a metric every point of which can be resampled gets the bootstrap's CIs."""
    span = _span(seeds, c.learning, c.learning_higher)
    learns = _learns(seeds, c.learning, c.learning_higher)
    both = span is not None and c.reference_span is not None and learns
    little = _too_little(c, span) if both else None
    levels = matched_levels(c.reference_span, span, c.n_levels) if both and not little else []
    metrics = []
    for metric, higher in c.forgetting:
        rows = compare_metric(_fronts(ref_seeds, c.learning, c.learning_higher, metric, higher),
                              _fronts(seeds, c.learning, c.learning_higher, metric, higher),
                              levels, c.learning_higher)
        how = INDEPENDENT
        if boot is not None and boot.supports(metric):
            rows = family_rows(boot, c, ref_seeds, seeds, name, metric, higher, rows, levels)
            how = PAIRED if boot.resample.paired else UNPAIRED
        label, text = summarise([r.diff.verdict if r.diff else None for r in rows])
        why = text if levels else little or _no_levels(c, span, learns)
        metrics.append(MetricComparison(metric, higher, rows, label, why, how))
    return FamilyComparison(name, sorted(seeds), sum(map(len, seeds.values())), span, levels, metrics)
