"""The report's numbers as text: cell formatting and the summary table, one row per entry.

`summary_table` is what `workbench eval` prints after writing results.json; the HTML page and
report.md show the same rows.
"""

from __future__ import annotations

from workbench.formats.results import Results, is_finite
from workbench.report.plots import ReportEntry

MISSING = "—"
NOTHING = "adapter changes nothing"
# (header, metric, signed, with CI): the few metrics a reader scans first, in reading order
SUMMARY = [
    ("val loss", "learning.val_loss.tuned", False, False),
    ("exact match", "learning.exact_match.tuned", False, False),
    ("ppl ratio [CI]", "retention.general.ppl.ratio", False, True),
    ("KL", "retention.general.kl", False, False),
    ("mc acc Δ [CI]", "retention.mc.all.acc.delta", True, True),
    ("MIA AUC (loss)", "overfitting.mia.loss.auc", False, False),
    ("ECE tuned", "calibration.all.ece.tuned", False, False),
]


def summary_table(results: Results | dict) -> str:
    """The summary table of one results file (or its payload) as fixed-width text, for a terminal."""
    entries = [ReportEntry(e.name, e) for e in Results.of(results).entries]
    headers, rows = summary_rows(entries)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def summary_rows(entries: list[ReportEntry]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the summary: one row per entry, cells already formatted."""
    headers = ["entry", "scale"] + [h for h, *_ in SUMMARY] + ["changes model"]
    rows = [[e.name, fmt_scale(e)] + [metric_cell(e, *spec) for _, *spec in SUMMARY] + [_changes(e)]
            for e in entries]
    return headers, rows


def fmt(v, signed: bool = False) -> str:
    """3 decimals in the usual range, 3 significant digits outside it; None or NaN is a dash."""
    if not is_finite(v):
        return MISSING
    spec = ".3f" if v == 0 or 1e-3 <= abs(v) < 1e4 else ".3g"
    return format(v, ("+" if signed else "") + spec)


def metric_cell(entry: ReportEntry, name: str, signed: bool = False, with_ci: bool = True) -> str:
    v = entry.value(name)
    if v is None:
        return MISSING
    ci = entry.interval(name) if with_ci else None
    return fmt(v, signed) + (f" [{fmt(ci[0], signed)}, {fmt(ci[1], signed)}]" if ci else "")


def ci_cell(entry: ReportEntry, name: str) -> str:
    ci = entry.interval(name)
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else MISSING


def fmt_scale(entry: ReportEntry) -> str:
    scale = entry.entry.scale
    return f"{scale:g}" if is_finite(scale) else MISSING


def _changes(entry: ReportEntry) -> str:
    changes = entry.entry.changes_model
    return {True: "yes", False: f"NO: {NOTHING}"}.get(changes, MISSING)
