"""Forgetting at matched learning on the page: `workbench compare`'s verdicts, above the per-run
detail, since "does this regularizer beat training less?" is the question a reader comes with.

Where the table comes from: a compare.json given as an input (what `workbench compare --out`
wrote, with the flags its user chose) is shown as it is. Without one it is computed here from the
results entries with compare's own functions and defaults (reference `baseline`, the default
forgetting metrics, 5 levels) and written out with compare's `to_json`, so the page and
`workbench compare` on the same files print the same verdicts. A report is not where a study
should fail, though: where compare exits 2 (no reference family, a family with one point, files
from different suites) the page says why in one line, and a family with one point is left out
and named rather than costing every other family its row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from workbench.compare import points as pts
from workbench.compare.analysis import REPLICATES, Comparison, family_comparison
from workbench.compare.paired import Bootstrap
from workbench.compare.command import to_json
from workbench.compare.frontier import Z95, overlap
from workbench.errors import UsageError
from workbench.formats import comparison as cmp
from workbench.report.families import DEFAULT_REFERENCE, grouped
from workbench.report.plots import ReportEntry
from workbench.report.tables import MISSING

N_LEVELS = 5  # compare's default --levels
COMPUTED = "computed by the report from the results entries, with workbench compare's defaults"


@dataclass
class Matched:
    """What the page shows: one table per comparison, or a one-line note on why there is none."""

    tables: list[dict] = field(default_factory=list)
    note: str | None = None
    reference: str | None = None  # the family the plots shade as training less; None: none with a front


def matched(entries: list[ReportEntry], results: Sequence[Path],
            given: Sequence[tuple[Path, cmp.Comparison]]) -> Matched:
    """The tables of the compare.json files given, else one computed from the entries."""
    if given:
        return Matched([table(data, str(path)) for path, data in given], None, given[0][1].reference.family)
    seeds = grouped(entries).get(DEFAULT_REFERENCE, {})
    reference = DEFAULT_REFERENCE if seeds and all(len(m) > 1 for m in seeds.values()) else None
    if not entries:
        return Matched(reference=reference)
    try:
        data, notes = compute(entries, results)
    except UsageError as why:
        return Matched(note=f"No matched-learning comparison: {why}.", reference=reference)
    data = cmp.Comparison.model_validate(data)
    return Matched([table(data, COMPUTED, notes)], None, data.reference.family)


def compute(entries: list[ReportEntry], results: Sequence[Path]) -> tuple[dict, list[str]]:
    """(compare.json payload, notes on what was left out); UsageError says why there is none."""
    pts.read_entries(results)  # compare's check that the files come from one suite and base model
    learning = pts.DEFAULT_LEARNING
    learning_higher = pts.direction(learning, "learning")
    families = grouped(entries, learning)
    if not families:
        raise UsageError(f"no entry has {learning}, the learning axis")
    notes = []
    placed = {p.name for seeds in families.values() for m in seeds.values() for p in m}
    lacking = [e.name for e in entries if e.name not in placed]
    if lacking:
        notes.append(f"left out, no {learning}: {', '.join(lacking)}")
    single = [f for f, seeds in families.items() if any(len(m) < 2 for m in seeds.values())]
    if single:
        notes.append(f"left out, one point (in some seed), so no front: {', '.join(single)}")
    kept = {f: seeds for f, seeds in families.items() if f not in single}
    if DEFAULT_REFERENCE in single:
        raise UsageError(f"the reference family {DEFAULT_REFERENCE!r} has one point (in some seed) and a front "
                         "needs two: evaluate its adapter scales or checkpoints too")
    if DEFAULT_REFERENCE not in kept:
        raise UsageError(f"no family {DEFAULT_REFERENCE!r} to stand for training less (families: "
                         f"{', '.join(families) or 'none'}); give the report the compare.json of "
                         "`workbench compare --reference FAMILY --out compare.json`")
    if len(kept) == 1:
        raise UsageError(f"only the reference family {DEFAULT_REFERENCE!r} has two or more points")
    used, skipped = pts.default_forgetting([e for s in kept.values() for m in s.values() for e in m])
    wanted = [(m, pts.direction(m, "forgetting")) for m in used]
    kept = pts.with_base_point(kept, [learning, *used])  # the base is on every family's curve, as in compare
    ref = kept[DEFAULT_REFERENCE]
    boot = Bootstrap(kept, learning, learning_higher, REPLICATES, 0, paired=True)  # as `workbench compare`
    c = Comparison(list(results), learning, learning_higher, DEFAULT_REFERENCE, sorted(ref), _count(ref),
                   _span(ref, learning, learning_higher), wanted, skipped, N_LEVELS, replicates=REPLICATES, seed=0)
    for name, seeds in kept.items():
        if name != DEFAULT_REFERENCE:
            c.families.append(family_comparison(c, ref, name, seeds, boot))
    return to_json(c), notes


def _count(seeds: dict) -> int:
    return sum(map(len, seeds.values()))


def _span(seeds: dict, learning: str, higher: bool) -> tuple[float, float] | None:
    """The learning costs every seed reaches (as compare's: a level must be backed by all)."""
    return overlap(*(pts.learning_span(m, learning, higher) for m in seeds.values()))


def table(data: cmp.Comparison, source: str, notes: Sequence[str] = ()) -> dict:
    """The templates' view of one compare.json: a row per family and forgetting metric (verdict,
    where, over which learning), and a row per level for the fold below it."""
    notes, z = list(notes), data.z or Z95
    rows, detail = [], []
    for fam in data.families:
        levels = fam.levels
        span = f"{levels[0].learning:.4g} → {levels[-1].learning:.4g}" if levels else MISSING
        for m in fam.metrics:
            rows.append({"family": fam.family, "metric": m.metric, "verdict": m.verdict,
                         "where": m.summary, "levels": span})
            detail += [{"family": fam.family, "metric": m.metric, "level": r.level,
                        "learning": _number(r.learning), "reference": _estimate(r.reference, z),
                        "value": _estimate(r.family, z), "difference": _difference(r.difference),
                        "verdict": r.verdict or f"no comparison ({r.note or 'not reached'})"}
                       for r in m.rows]
    if any(e.value_only for fam in data.families for m in fam.metrics for r in m.rows
           for e in (r.reference, r.family) if e):
        notes.append("* rests on a metric with no CI in results.json: its se is taken as 0")
    if data.forgetting_left_out:
        notes.append(f"left out, missing from some entries: {', '.join(data.forgetting_left_out)}")
    ref = data.reference
    return {"source": source, "learning": data.learning.metric,
            "better": "higher" if data.learning.higher_is_better else "lower",
            "reference": ref.family, "reference_points": ref.points,
            "reference_seeds": ", ".join(map(str, ref.seeds)), "rows": rows, "detail": detail,
            "notes": notes}


def _number(x: float | None) -> str:
    return MISSING if x is None else f"{x:.4g}"


def _estimate(e: cmp.Estimate | None, z: float) -> str:
    """'1.043 ± 0.0039' (the 95% half-width), '*' when it rests on a value without a CI."""
    if e is None:
        return MISSING
    return f"{e.value:.4g} ± {z * e.se:.2g}" + ("*" if e.value_only else "")


def _difference(d: cmp.Difference | None) -> str:
    if d is None:
        return MISSING
    lo, hi = d.ci
    return f"{d.value:+.3g} [{lo:+.3g}, {hi:+.3g}]"
