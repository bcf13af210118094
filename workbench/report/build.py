"""`workbench report`: a static HTML page and a Markdown file comparing tuned adapters with their
base and with training less, built from results files (`workbench eval`), run records
(`workbench train`) and compare.json files (`workbench compare`).

    out/index.html   self-contained: plots embedded as PNG data URIs, plain CSS, no JavaScript
    out/report.md    the same tables, plots referenced as plots/*.png
    out/plots/*.png

The pages are rendered from the Jinja templates in `templates/`, both from one context built
here. The page leads with forgetting at matched learning (workbench.report.matched) and the
learning-vs-forgetting fronts; the per-run and per-entry detail follows, folded into <details>
so it does not bury the answer. Every file is written atomically, index.html last, so a killed
report leaves the previous page.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, FileSystemLoader

from workbench.errors import UsageError
from workbench.formats.run_record import describe_state
from workbench.io import atomic_path
from workbench.report.inputs import Run, load_inputs
from workbench.report.matched import matched
from workbench.report.plots import ReportEntry, loss_figure, reliability_figure, roc_figure, save
from workbench.report.tables import MISSING, NOTHING, ci_cell, fmt, fmt_scale, metric_cell, summary_rows
from workbench.report.tradeoff import FORGETTING, MC_RETENTION, tradeoff_figure

TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass
class Plot:
    title: str
    file: str  # relative to the report directory
    uri: str  # the PNG as a data URI


def build_report(inputs: list[str | Path], out: str | Path, policy: str | Path | None = None) -> Path:
    """Write out/index.html, out/report.md and out/plots/; returns the path of index.html.

    inputs: run directories, run.json files, results.json files and compare.json files, in any
    mix. Runs named by a results entry's "run" field are added when their run.json exists.
    policy: a gate policy; the page then opens with the release decision (`gate.decision`).
    """
    out = _out_dir(out)
    loaded = load_inputs(inputs)
    gate = _gate(policy, loaded.results)
    entries = loaded.entries
    comparison = matched(entries, loaded.results, loaded.comparisons)  # before any file is written
    plots = PlotDir(out / "plots")
    context = {
        "title": "Workbench report", "sources": loaded.sources, "nothing": NOTHING, "gate": gate,
        "why": "the adapter's delta is exactly zero, so its scores are the base's",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "flagged": [e.name for e in entries if e.entry.changes_model is False],
        "matched": comparison, "summary": summary_rows(entries),
        "tradeoff": _tradeoff_plots(entries, comparison.reference, plots),
        "runs": [_run_context(run, plots) for run in loaded.runs],
        "entries": [_entry_context(e, plots) for e in entries],
    }
    _write_text(out / "report.md", _template("report.md.j2", autoescape=False).render(**context))
    _write_text(out / "index.html", _template("index.html.j2", autoescape=True).render(**context))
    plots.remove_stale()
    return out / "index.html"


def _gate(policy_path: str | Path | None, results: list[Path]) -> dict | None:
    """The release decision over every results file, as `workbench gate --json` writes it, with
    the failing checks first; None without a policy."""
    if policy_path is None:
        return None
    from workbench.formats.results import load_results
    from workbench.gate import check, decision, load_policy

    policy = load_policy(policy_path)
    if not results:
        raise UsageError(f"report --policy {policy_path}: give a results.json to gate")
    checks = [c for path in results for c in check(load_results(path), policy)]
    outcome = decision(checks, policy, ", ".join(map(str, results)))
    order = {"fail": 0, "missing": 1, "pass": 2, "skipped": 3}
    outcome["rows"] = sorted(outcome["checks"], key=lambda c: order[c["status"]])
    for row in outcome["rows"]:
        row["shown"] = "-" if row["observed"] is None else f"{row['observed']:.4g}"
    return outcome


def _template(name: str, autoescape: bool):
    """A page template; Markdown cells escape their pipes (`cell`), HTML escapes everything."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=autoescape, trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["cell"] = lambda text: str(text).replace("|", "\\|")
    env.filters["escape_md"] = lambda text: str(text).replace("*", "\\*")  # a bare * starts emphasis
    return env.get_template(name)


class PlotDir:
    """Saves figures as uniquely named PNGs in one directory and remembers what it wrote."""

    def __init__(self, root: Path):
        self.root = root
        self.written: list[Path] = []

    def save(self, fig, stem: str, title: str) -> Plot | None:
        if fig is None:
            return None
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "plot"
        path, n = self.root / f"{slug}.png", 1
        while path in self.written:
            n += 1
            path = self.root / f"{slug}-{n}.png"
        save(fig, path)
        self.written.append(path)
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return Plot(title, f"{self.root.name}/{path.name}", uri)

    def remove_stale(self) -> None:
        """Drop PNGs a previous report left that this one does not reference."""
        for path in self.root.glob("*.png"):
            if path not in self.written:
                path.unlink(missing_ok=True)


def _tradeoff_plots(entries: list[ReportEntry], reference: str | None, plots: PlotDir) -> list[Plot]:
    forgetting = next((x for x in FORGETTING if any(e.value(x[0]) is not None for e in entries)), None)
    shaded = f"; shaded: forgets more than {reference} (training less) at that learning" if reference else ""
    made = [plots.save(tradeoff_figure(entries, forgetting, reference), "tradeoff",
                       f"Learning vs forgetting: each family's Pareto front{shaded}") if forgetting else None,
            plots.save(tradeoff_figure(entries, MC_RETENTION, reference), "tradeoff-mc",
                       f"Learning vs multiple-choice retention: each family's Pareto front{shaded}")]
    return [p for p in made if p]


def _run_context(run: Run, plots: PlotDir) -> dict:
    record = run.record
    final = record.final or {}
    penalties = ", ".join(record.penalties) or "none"
    steps = "?" if record.global_step is None else record.global_step
    meta = (f"recipe {record.name}; penalties: {penalties}; status {describe_state(record, run.path)}; "
            f"{steps} steps; final eval loss {fmt(final.get('eval_loss'))}")
    return {"label": run.label, "meta": meta,
            "plot": plots.save(loss_figure(run.label, record), f"loss-{run.path.resolve().name}",
                               f"Training losses: {run.label}")}


def _entry_context(entry: ReportEntry, plots: PlotDir) -> dict:
    rows = [(name, metric_cell(entry, name, with_ci=False), ci_cell(entry, name))
            for name in sorted(entry.entry.metrics)]
    meta = (f"adapter {entry.entry.adapter or '?'}; scale {fmt_scale(entry)}; "
            f"run {entry.run or entry.entry.run or MISSING}; from {entry.source or '?'}")
    return {"name": entry.name, "meta": meta,
            "nothing": entry.entry.changes_model is False, "metrics": rows,
            "plots": [p for p in _entry_plots(entry, plots) if p]}


def _entry_plots(entry: ReportEntry, plots: PlotDir) -> list[Plot | None]:
    curves = entry.entry.curves
    tasks = [k.split(".")[1] for k in curves
             if k.startswith("calibration.") and k.endswith(".reliability")]
    task = "all" if "all" in tasks else (tasks[0] if tasks else None)
    made = []
    if task:
        ece = {s: entry.value(f"calibration.{task}.ece.{s}") for s in ("base", "tuned")}
        title = f"Reliability ({task}): {entry.name}"
        made.append(plots.save(reliability_figure(title, curves[f"calibration.{task}.reliability"], ece),
                               f"reliability-{entry.name}", title))
    prefix, suffix = "overfitting.mia.", ".roc"
    rocs = {k[len(prefix):-len(suffix)]: c for k, c in curves.items()
            if k.startswith(prefix) and k.endswith(suffix)}
    if rocs:
        aucs = {s: entry.value(f"{prefix}{s}.auc") for s in rocs}
        title = f"Membership inference ROC: {entry.name}"
        made.append(plots.save(roc_figure(title, rocs, aucs), f"roc-{entry.name}", title))
    return made


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _out_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    return out
