"""`workbench summarize`: one table across cells, each cell a `workbench compare` run.

A study is a matrix of cells (model x kind of fine-tune). Each cell's compare.json holds, per
family and forgetting metric, the difference family - reference (training less) at matched
learning levels with a 95% CI. This table gives one row per family and one column per cell: the
verdict and the difference at the most learning both fronts reach in that cell (the last level
whose row has a difference), then a pooled column, the DerSimonian-Laird random-effects
combination of those differences (workbench.compare.pooling: why random effects, and the
formulas). Each difference enters with the se its compare.json records (`difference.se`; under
the paired bootstrap, the replicates' sd). A cell where the family has no comparison, is absent,
or has an se of 0 is left out of the pool and shown as such.

Differences are pooled only within one forgetting metric: a perplexity ratio and a KL are not
in the same units. One table per metric; by default the first forgetting metric every cell has.
The learning metric, the reference family and the CI method may differ between cells: each
cell's difference is already taken at that cell's own matched learning.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from workbench.compare.command import writable, write_outputs
from workbench.compare.pooling import Pooled, dersimonian_laird
from workbench.config.suggest import did_you_mean
from workbench.errors import UsageError
from workbench.formats.comparison import MetricRows, read_comparison

KIND = "workbench.summary"
SCHEMA_VERSION = 1
COMPARED, NO_COMPARISON, ABSENT = "compared", "no comparison", "absent"
CELL_WIDTH = 34  # a column's widest line: a difference with its CI fits (24 characters); reasons wrap


@dataclass(frozen=True)
class Outcome:
    """One family on one metric in one cell: at the most learning both fronts reach, or why not."""

    status: str                        # COMPARED, NO_COMPARISON or ABSENT
    label: str = ""                    # the cell's verdict over all levels ('helps', 'mixed', ...)
    summary: str = ""                  # where it holds, or why there is no comparison
    level: str = ""                    # 'L5'
    learning: float | None = None      # the level in the cell's learning metric's units
    value: float | None = None         # family - reference, metric units
    se: float | None = None
    ci: tuple[float, float] | None = None
    verdict: str = ""                  # at that level: helps, no different, worse

    @property
    def poolable(self) -> bool:
        return self.status == COMPARED and self.se is not None and self.se > 0


@dataclass
class Cell:
    name: str
    path: Path
    reference: str
    learning: str
    metrics: list[tuple[str, bool]]                   # (forgetting metric, higher is better)
    methods: dict[str, str]                           # metric -> CI method
    outcomes: dict[str, dict[str, Outcome]] = field(default_factory=dict)  # family -> metric -> outcome


@dataclass(frozen=True)
class Row:
    family: str
    outcomes: list[Outcome]            # one per cell, in the cells' order
    pooled: Pooled | None              # None when no cell can be pooled
    verdict: str                       # of the pooled CI: helps, no different, worse, no comparison


@dataclass(frozen=True)
class Summary:
    cells: list[Cell]
    metric: str
    higher: bool
    rows: list[Row]


def parse_cells(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """NAME=PATH arguments, names unique and files distinct (a cell given twice would be counted
    twice in the pool). The name is everything before the first '=', so a path may hold one."""
    cells: list[tuple[str, Path]] = []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name.strip() or not path.strip():
            raise UsageError(f"{spec!r}: give a cell as NAME=compare.json, such as "
                             "smollm2/unscramble=runs/smollm2-unscramble/compare.json")
        if any(name == n for n, _ in cells):
            raise UsageError(f"cell {name!r} is named twice; give each cell its own name")
        same = next((n for n, p in cells if p.resolve() == Path(path).resolve()), None)
        if same is not None:
            raise UsageError(f"cells {same!r} and {name!r} read the same file {path}; a cell pooled twice "
                             "would count twice")
        cells.append((name, Path(path)))
    if not cells:
        raise UsageError("name at least one cell as NAME=compare.json")
    return cells


def _outcome(m: MetricRows) -> Outcome:
    """A family's metric record of compare.json as an Outcome at its last compared level."""
    row = next((r for r in reversed(m.rows) if r.difference is not None), None)
    if row is None:
        return Outcome(NO_COMPARISON, m.verdict, m.summary)
    d = row.difference
    if not all(map(math.isfinite, (d.value, d.se, *d.ci))):
        raise ValueError(f"a non-finite difference at {row.level}")
    return Outcome(COMPARED, m.verdict, m.summary, row.level, row.learning, d.value, d.se, d.ci, str(row.verdict))


def read_cell(name: str, path: Path) -> Cell:
    """One compare.json as a Cell, or a one-line UsageError naming the cell and the file."""
    try:
        data = read_comparison(path, "summarize")
    except UsageError as exc:
        raise UsageError(f"cell {name!r}: {exc}") from None
    cell = Cell(name, path, data.reference.family, data.learning.metric,
                [(f.metric, f.higher_is_better) for f in data.forgetting], {})
    try:
        for fam in data.families:
            for m in fam.metrics:
                cell.methods.setdefault(m.metric, m.method)
                cell.outcomes.setdefault(fam.family, {})[m.metric] = _outcome(m)
    except ValueError as exc:
        raise UsageError(f"cell {name!r}: {path}: not a valid compare.json ({exc})") from None
    return cell


def choose_metrics(cells: Sequence[Cell], wanted: Sequence[str] | None) -> list[tuple[str, bool]]:
    """The metrics to tabulate, each with its direction: those asked for, every one of which
    every cell must have, or else the first forgetting metric (in the first cell's order) that
    every cell shares."""
    shared = [m for m in cells[0].metrics if all(m[0] in dict(c.metrics) for c in cells[1:])]
    if not wanted:
        if not shared:
            listed = "; ".join(f"{c.name}: {', '.join(m for m, _ in c.metrics) or 'none'}" for c in cells)
            raise UsageError(f"no forgetting metric is in every cell, so no difference can be pooled ({listed})")
        return shared[:1]
    out = []
    for metric in dict.fromkeys(wanted):
        lacking = [c for c in cells if metric not in dict(c.metrics)]
        if lacking:
            hint = did_you_mean(metric, (m for m, _ in lacking[0].metrics), cutoff=0.5)
            raise UsageError(f"--metric: {metric!r} is not compared in cell {lacking[0].name!r}{hint}; "
                             f"every cell has: {', '.join(m for m, _ in shared) or 'none'}")
        directions = {dict(c.metrics)[metric] for c in cells}
        if len(directions) > 1:
            raise UsageError(f"--metric: {metric}: the cells disagree on whether higher is better")
        out.append((metric, directions.pop()))
    return out


def pooled_verdict(p: Pooled | None, higher: bool) -> str:
    """helps when the pooled CI lies on the side that forgets less (below 0 for a lower-is-better
    metric, above 0 for a higher-is-better one), worse on the other, else no different."""
    if p is None:
        return NO_COMPARISON
    less, more = (p.lo > 0, p.hi < 0) if higher else (p.hi < 0, p.lo > 0)
    return "helps" if less else "worse" if more else "no different"


def summarize(cells: Sequence[Cell], metric: str, higher: bool) -> Summary:
    """One row per family that some cell compares (in order of first appearance), its outcome in
    every cell and the random-effects pool of the cells where it has a difference with se > 0."""
    families = list(dict.fromkeys(f for c in cells for f in c.outcomes))
    rows = []
    for fam in families:
        outcomes = []
        for c in cells:
            found = c.outcomes.get(fam, {}).get(metric)
            why = "the reference in this cell" if fam == c.reference else "not in this cell"
            outcomes.append(found or Outcome(ABSENT, summary=why))
        pool = [o for o in outcomes if o.poolable]
        p = dersimonian_laird([o.value for o in pool], [o.se for o in pool]) if pool else None
        rows.append(Row(fam, outcomes, p, pooled_verdict(p, higher)))
    return Summary(list(cells), metric, higher, rows)


# ---------------------------------------------------------------- output


def _ci(value: float, lo: float, hi: float) -> str:
    return f"{value:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def cell_text(o: Outcome) -> list[str]:
    """The lines of one cell: the verdict at the most learning both reach, the difference with its
    CI, and the cell's verdict over all levels where it says more."""
    if o.status == ABSENT:
        return [o.summary]
    if o.status == NO_COMPARISON:
        return ["no comparison", o.summary.removeprefix("no comparison: ")]
    lines = [f"{o.verdict} at {o.level}", _ci(o.value, *o.ci)]
    if o.label != o.verdict:
        lines.append(f"({o.summary})")
    if not o.poolable:
        lines.append("se 0: not pooled")
    return lines


def pooled_text(r: Row, n_cells: int) -> list[str]:
    p = r.pooled
    if p is None:
        return ["no comparison", f"no cell of {n_cells} to pool"]
    spread = "τ², I² need 2" if p.i2 is None else f"τ² {p.tau2:.2g}, I² {p.i2:.0%}"
    return [r.verdict, _ci(p.value, p.lo, p.hi), f"{p.k} of {n_cells} cells; {spread}"]


def notes(s: Summary) -> list[str]:
    better = "higher" if s.higher else "lower"
    lines = [f"{s.metric} ({better} is better, so 'helps' is a CI {'above' if s.higher else 'below'} 0): "
             "family - reference (training less) at the most learning both fronts reach in each cell, "
             "with its 95% CI",
             "pooled: DerSimonian-Laird random effects over the cells with a comparison (k of them); τ² the "
             "between-cell variance of the effect, I² the share of the cells' spread beyond chance"]
    for c in s.cells:
        lines.append(f"{c.name}: {c.path}; reference {c.reference}, learning {c.learning}, CIs "
                     f"{c.methods.get(s.metric) or 'unknown'}")
    return lines


def format_table(s: Summary) -> str:
    """A plain-text table: one row per family, one column per cell, then the pooled column. As wide
    as its columns need (2 models x 3 tasks: 6 cells and the pool, about 270 characters), so that
    no difference is cut in two; a narrower terminal wraps whole lines."""
    table = Table(box=box.ASCII2, show_edge=False, pad_edge=False, show_lines=True)
    table.add_column("family", justify="left")
    for c in s.cells:
        table.add_column(c.name, justify="left", overflow="fold", max_width=CELL_WIDTH)
    table.add_column("pooled (random effects)", justify="left", overflow="fold", max_width=CELL_WIDTH)
    for r in s.rows:
        table.add_row(r.family, *("\n".join(cell_text(o)) for o in r.outcomes), "\n".join(pooled_text(r, len(s.cells))))
    out = io.StringIO()
    width = max(map(len, ["family", *(r.family for r in s.rows)])) + (len(s.cells) + 1) * (CELL_WIDTH + 3)
    Console(file=out, width=width, color_system=None, force_terminal=False, markup=False,
            highlight=False, emoji=False).print(table)
    return "\n".join([s.metric, *(line.rstrip() for line in out.getvalue().splitlines()), "", *notes(s)])


def markdown(summaries: Sequence[Summary]) -> str:
    """One Markdown table per metric: the same cells, bold verdicts, one line per cell."""
    lines = ["# Verdicts across cells", ""]
    for s in summaries:
        lines += [f"## `{s.metric}`", "",
                  "| family | " + " | ".join(f"`{c.name}`" for c in s.cells) + " | pooled (random effects) |",
                  "|---|" + "---|" * (len(s.cells) + 1)]
        for r in s.rows:
            cells = []
            for o in r.outcomes:
                first, *rest = cell_text(o)
                cells.append(f"**{first}**" + "".join(f"<br>{x}" for x in rest))
            first, *rest = pooled_text(r, len(s.cells))
            cells.append(f"**{first}**" + "".join(f"<br>{x}" for x in rest))
            lines.append(f"| {r.family} | " + " | ".join(cells) + " |")
        lines += [""] + [f"- {n}" for n in notes(s)] + [""]
    return "\n".join(lines)


def _outcome_json(c: Cell, o: Outcome) -> dict:
    return {"cell": c.name, "status": o.status, "verdict": o.verdict or None, "label": o.label or None,
            "summary": o.summary, "level": o.level or None, "learning": o.learning,
            "difference": None if o.value is None else {"value": o.value, "se": o.se, "ci": list(o.ci)},
            "pooled": o.poolable}


def to_json(summaries: Sequence[Summary]) -> dict:
    """The versioned summary file (docs/compare.md, "Across cells")."""
    cells = summaries[0].cells
    return {
        "kind": KIND, "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cells": [{"name": c.name, "path": str(c.path), "reference": c.reference, "learning": c.learning}
                  for c in cells],
        "tables": [{
            "metric": s.metric, "higher_is_better": s.higher,
            "families": [{
                "family": r.family, "cells": [_outcome_json(c, o) for c, o in zip(s.cells, r.outcomes)],
                "pooled": None if r.pooled is None else {
                    "method": "DerSimonian-Laird", "value": r.pooled.value, "se": r.pooled.se,
                    "ci": [r.pooled.lo, r.pooled.hi], "tau2": r.pooled.tau2, "i2": r.pooled.i2,
                    "q": r.pooled.q, "k": r.pooled.k, "verdict": r.verdict,
                    "cells": [c.name for c, o in zip(s.cells, r.outcomes) if o.poolable]},
            } for r in s.rows],
        } for s in summaries],
    }


def run_summarize(specs: Sequence[str], metrics: Sequence[str] | None = None, out: Path | None = None,
                  markdown_path: Path | None = None) -> int:
    """Print one table per metric; write the JSON and Markdown when asked. 0 when it ran (the
    verdicts are findings, not failures); bad input raises a one-line UsageError."""
    writable(out, "--out", "summary.json")
    writable(markdown_path, "--markdown", "summary.md")
    cells = [read_cell(name, path) for name, path in parse_cells(specs)]
    summaries = [summarize(cells, m, higher) for m, higher in choose_metrics(cells, metrics)]
    print("\n\n".join(format_table(s) for s in summaries))
    others = [m for m, _ in cells[0].metrics if all(m in dict(c.metrics) for c in cells)
              and m not in {s.metric for s in summaries}]
    if others:
        print(f"\nalso in every cell (--metric METRIC for its table): {', '.join(others)}")
    write_outputs("summary", out, lambda: to_json(summaries), markdown_path, lambda: markdown(summaries))
    return 0
