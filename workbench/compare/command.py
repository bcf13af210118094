"""`workbench compare`: the comparison as a terminal table, Markdown and a versioned compare.json.

Every number is shown in its metric's own units (the costs of workbench.compare.frontier turned
back), the difference is family - reference, and the verdict column reads "than training less":
helps (the 95% CI lies on the side that forgets less), worse (on the other side), no different.
The compare.json layout is documented in docs/compare.md.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from workbench.compare.analysis import (INDEPENDENT, Comparison, FamilyComparison, LevelRow, compare,
                                        in_units)
from workbench.compare.frontier import Z95, Difference, Estimate
from workbench.compare.points import DEFAULT_LEARNING
from workbench.errors import UsageError
from workbench.formats.comparison import KIND, SCHEMA_VERSION, validated
from workbench.io import atomic_path, write_json

NO_CI = "*"  # marks an estimate resting on a metric without a CI (its se taken as 0)


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _estimate(e: Estimate | None, higher: bool) -> str:
    """'1.043 ± 0.0039' (± the 95% half-width), '*' appended when a point had no CI."""
    if e is None:
        return "-"
    return f"{in_units(e.value, higher):.4g} ± {Z95 * e.se:.2g}{NO_CI if e.value_only else ''}"


def _difference(d: Difference | None, higher: bool) -> str:
    if d is None:
        return "-"
    lo, hi = sorted((in_units(d.lo, higher), in_units(d.hi, higher)))
    return f"{in_units(d.value, higher):+.3g} [{lo:+.3g}, {hi:+.3g}]"


def _verdict(row: LevelRow) -> str:
    return row.diff.verdict if row.diff else "no comparison"


def _rows(c: Comparison) -> list[tuple[str, ...]]:
    """(family, metric, level, learning, reference, family value, difference, verdict) strings."""
    out = []
    for fam in c.families:
        for m in fam.metrics:
            if not m.rows:
                out.append((fam.family, m.metric, "-", "-", "-", "-", "-", "no comparison"))
            for r in m.rows:
                out.append((fam.family, m.metric, f"L{r.level}", _number(r.learning),
                            _estimate(r.reference, m.higher), _estimate(r.family, m.higher),
                            _difference(r.diff, m.higher), _verdict(r)))
    return out


def method_line(c: Comparison) -> str:
    """Which CIs the table holds, and for which metrics when they differ."""
    def said(method: str) -> str:
        if method == INDEPENDENT:
            return (f"{method} (each point's stated CI as independent noise: the results files hold no "
                    "per-item scores for every point)")
        return f"{method} over items ({c.replicates} replicates, seed {c.seed}, percentile 95% CIs)"

    methods = c.methods
    if len(methods) == 1:
        return f"CIs: {said(methods[0])}"
    per = {m: [x.metric for f in c.families for x in f.metrics if x.method == m] for m in methods}
    return "CIs: " + "; ".join(f"{said(m)} for {', '.join(dict.fromkeys(names))}" for m, names in per.items())


def _notes(c: Comparison) -> list[str]:
    """What the numbers rest on that the table cannot show."""
    notes = [method_line(c)]
    if any(r.reference and r.reference.value_only or r.family and r.family.value_only
           for f in c.families for m in f.metrics for r in m.rows):
        notes.append(f"{NO_CI} rests on a metric with no CI in results.json: its se is taken as 0")
    if c.skipped:
        notes.append(f"left out (missing from some entries): {', '.join(c.skipped)}")
    return notes


def _summary(c: Comparison) -> list[str]:
    """One line per family and metric, then what the columns mean and the notes."""
    seeds = ", ".join(map(str, c.reference_seeds))
    return ([f"{f.family}: {m.metric}: {m.text}" for f in c.families for m in f.metrics]
            + ["", f"reference (training less): {c.reference}, {c.reference_points} points, seeds {seeds}; "
               "difference = family - reference; L1 is the least learning; ± is the 95% half-width"]
            + _notes(c))


def format_table(c: Comparison, width: int = 160) -> str:
    """A plain-text (ASCII, no colour) table of every level, then the per-metric summaries."""
    table = Table(box=box.ASCII2, show_edge=False, pad_edge=False)
    for column, justify in [("family", "left"), ("forgetting metric", "left"), ("level", "left"),
                            (c.learning, "right"), ("reference", "right"), ("family value", "right"),
                            ("difference [95% CI]", "right"), ("vs training less", "left")]:
        table.add_column(column, justify=justify, overflow="fold")
    for row in _rows(c):
        table.add_row(*row)
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False, markup=False,
            highlight=False, emoji=False).print(table)
    lines = [line.rstrip() for line in out.getvalue().splitlines()]
    return "\n".join(lines + [""] + _summary(c))


def _at_most_learning(m) -> str:
    """The difference at the level of most learning that both fronts reach, with its level."""
    row = next((r for r in reversed(m.rows) if r.diff is not None), None)
    return "" if row is None else f"{_difference(row.diff, m.higher)} at L{row.level}"


def overview(c: Comparison) -> list[str]:
    """A Markdown table, one row per family: each metric's verdict, where, and the difference
    at the most learning both fronts reach (the number a reader wants first)."""
    metrics = [m for m, _ in c.forgetting]
    lines = ["| family | points | seeds | " + " | ".join(f"`{m}`" for m in metrics) + " |",
             "|---|---:|---|" + "---|" * len(metrics)]
    for fam in c.families:
        cells = []
        for m in fam.metrics:
            where = {"no different": "", "no comparison": ""}.get(m.label, f" ({m.text})")
            detail = _at_most_learning(m)
            cells.append(f"**{m.label}**{where}" + (f"; {detail}" if detail else ""))
        lines.append(f"| {fam.family} | {fam.points} | {', '.join(map(str, fam.seeds))} | " + " | ".join(cells) + " |")
    return lines


def markdown(c: Comparison) -> str:
    """The same as Markdown: an overview of the verdicts, then one section and table per family."""
    better = "higher" if c.learning_higher else "lower"
    lines = ["# Forgetting at matched learning", "",
             f"Inputs: {', '.join(f'`{p}`' for p in c.inputs)}. Learning: `{c.learning}` ({better} is "
             f"better). Reference, what training less gives: `{c.reference}` ({c.reference_points} points, "
             f"seeds {', '.join(map(str, c.reference_seeds))}). Difference = family − reference in the "
             "metric's units, with its 95% CI; a verdict needs the CI on one side of 0. "
             "L1 is the least learning.", ""]
    lines += ["## Verdicts", "", "Per family and forgetting metric: the verdict against training less, the levels "
              "it holds at, and the difference (family − reference) at the most learning both reach.", ""]
    lines += overview(c) + [""]
    for fam in c.families:
        lines += [f"## {fam.family}", "",
                  f"{fam.points} points, seeds {', '.join(map(str, fam.seeds))}.", "",
                  f"| metric | level | `{c.learning}` | reference | {fam.family} | difference [95% CI] | "
                  "vs training less |", "|---|---|---|---|---|---|---|"]
        lines += [f"| `{m}` | {lv} | {x} | {ref} | {val} | {d} | {v} |".replace(NO_CI, "\\" + NO_CI)
                  for _, m, lv, x, ref, val, d, v in _rows(_only(c, fam))]  # a bare * would start emphasis
        lines += [""] + [f"- `{m.metric}`: **{m.label}** ({m.text})" for m in fam.metrics] + [""]
    return "\n".join(lines + [n.replace(NO_CI, "\\" + NO_CI, 1) for n in _notes(c)]) + "\n"


def _only(c: Comparison, fam: FamilyComparison) -> Comparison:
    """The comparison narrowed to one family, for its own Markdown table."""
    return Comparison(**{**vars(c), "families": [fam]})


def _estimate_json(e: Estimate | None, higher: bool) -> dict | None:
    return None if e is None else {"value": in_units(e.value, higher), "se": e.se, "n_seeds": e.n_seeds,
                                   "value_only": e.value_only}


def _span(c: Comparison, span: tuple[float, float] | None) -> list[float] | None:
    return None if span is None else sorted(c.units(x) for x in span)


def to_json(c: Comparison) -> dict:
    """The versioned compare.json (docs/compare.md): every number in its metric's units."""
    def row(r: LevelRow, higher: bool) -> dict:
        d = r.diff
        return {"level": f"L{r.level}", "learning": r.learning,
                "reference": _estimate_json(r.reference, higher), "family": _estimate_json(r.family, higher),
                "difference": None if d is None else {
                    "value": in_units(d.value, higher), "se": d.se,
                    "ci": sorted((in_units(d.lo, higher), in_units(d.hi, higher)))},
                "verdict": d.verdict if d else None, "note": r.note or None}

    return validated({
        "kind": KIND, "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(p) for p in c.inputs],
        "learning": {"metric": c.learning, "higher_is_better": c.learning_higher},
        "forgetting": [{"metric": m, "higher_is_better": h} for m, h in c.forgetting],
        "forgetting_left_out": c.skipped,
        "reference": {"family": c.reference, "seeds": c.reference_seeds, "points": c.reference_points,
                      "span": _span(c, c.reference_span)},
        "levels_requested": c.n_levels, "z": Z95,
        "uncertainty": {"methods": c.methods, "replicates": 0 if c.methods == [INDEPENDENT] else c.replicates,
                        "seed": c.seed},
        "families": [{
            "family": f.family, "seeds": f.seeds, "points": f.points, "span": _span(c, f.span),
            "levels": [{"level": f"L{i}", "learning": c.units(x)} for i, x in enumerate(f.levels, start=1)],
            "metrics": [{"metric": m.metric, "higher_is_better": m.higher, "verdict": m.label,
                         "summary": m.text, "method": m.method, "rows": [row(r, m.higher) for r in m.rows]}
                        for m in f.metrics],
        } for f in c.families],
    })


def writable(path: Path | None, flag: str, example: str) -> None:
    if path is not None and path.is_dir():
        raise UsageError(f"{path}: {flag} is a directory; give a file name such as {path / example}")


def run_compare(results: Sequence[str | Path], learning: str | None = None, forgetting: Sequence[str] | None = None,
                reference: str | None = None, levels: int = 5, out: Path | None = None,
                markdown_path: Path | None = None) -> int:
    """Print the comparison table; write compare.json and Markdown when asked. 0 when it ran:
    the verdicts are findings, not failures. Bad input raises UsageError."""
    writable(out, "--out", "compare.json")
    writable(markdown_path, "--markdown", "compare.md")
    c = compare(results, learning or DEFAULT_LEARNING, forgetting, reference, levels)
    print(format_table(c))
    write_outputs("compare", out, lambda: to_json(c), markdown_path, lambda: markdown(c))
    return 0


def write_outputs(what: str, out: Path | None, payload, markdown_path: Path | None, text) -> None:
    """Write the JSON (`payload()`) and the Markdown (`text()`) that were asked for, each atomically,
    and say where: the tail of `compare` and `summarize` alike."""
    if out is not None:
        write_json(out, payload())
        print(f"{what}: {out}")
    if markdown_path is not None:
        with atomic_path(markdown_path) as tmp:
            tmp.write_text(text())
        print(f"markdown: {markdown_path}")
