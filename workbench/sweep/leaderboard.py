"""The sweep's leaderboard: its runs ranked by the objective, feasible runs first (under the
spec's constraints), as rows for `leaderboard.json` and as a fixed-width table.

A run is ranked on its run.json `final` (eval_loss, train_loss, ...) and, when it was evaluated,
the metrics of its scale-1 results entry.
"""

from __future__ import annotations

import math
from pathlib import Path

from workbench.errors import UsageError
from workbench.formats.results import is_finite, load_results
from workbench.formats.run_record import RunRecord, read_run
from workbench.sweep.spec import SweepSpec, Trial


def leaderboard(spec: SweepSpec, runs: list[Trial]) -> list[dict]:
    """One row per run, best first: completed runs meeting every constraint, by the objective;
    then runs that violate a constraint or lack the objective; then failed runs. Only the first
    group gets a rank."""
    rows = []
    for trial in runs:
        record = _record(trial.output_dir)
        metrics = run_metrics(trial.output_dir, record)
        value = metrics.get(spec.objective.metric)
        violated = [str(c) for c in spec.constraints if not c.holds(metrics.get(c.metric))]
        rows.append({"run": trial.name, "run_dir": str(trial.output_dir), "status": trial.status,
                     "error": trial.error, "knobs": trial.knobs, "objective": value,
                     "constraints": {c.metric: metrics.get(c.metric) for c in spec.constraints},
                     "feasible": trial.status == "completed" and not violated and value is not None,
                     "violated": violated, "wandb": record.wandb if record else None})
    sign = 1.0 if spec.objective.goal == "minimize" else -1.0
    rows.sort(key=lambda r: (r["status"] != "completed", not r["feasible"],
                             sign * r["objective"] if r["objective"] is not None else math.inf))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank if row["feasible"] else None
    return rows


def _record(run_dir: Path) -> RunRecord | None:
    """The run's record, or None for a run that failed before writing one."""
    try:
        return read_run(run_dir)
    except UsageError:
        return None


def run_metrics(run_dir: Path, record: RunRecord | None) -> dict[str, float]:
    """What a run can be ranked on: `final` of its record and its scale-1 results entry's metrics."""
    metrics = {k: float(v) for k, v in ((record.final or {}) if record else {}).items() if is_finite(v)}
    path = run_dir / "results.json"
    if not path.is_file():
        return metrics
    try:
        entries = load_results(path).entries
    except UsageError as exc:
        print(f"leaderboard: {exc}; {run_dir.name} is ranked on its training metrics only")
        return metrics
    entry = next((e for e in entries if e.scale == 1.0), None)
    if entry is not None:
        metrics.update({k: v for k in entry.metrics if (v := entry.value(k)) is not None})
    return metrics


def format_leaderboard(spec: SweepSpec, rows: list[dict]) -> str:
    """The leaderboard as a fixed-width table."""
    knobs = list(spec.parameters)
    headers = ["rank", "run", *(_short(k) for k in knobs), f"{spec.objective.metric} ({spec.objective.goal[:3]})",
               *(c.metric for c in spec.constraints), "note"]
    table = [headers]
    for r in rows:
        table.append([str(r["rank"] or "-"), r["run"], *(_fmt(r["knobs"][k]) for k in knobs),
                      _fmt(r["objective"]), *(_fmt(r["constraints"][c.metric]) for c in spec.constraints),
                      _note(spec, r)])
    widths = [max(len(row[i]) for row in table) for i in range(len(headers) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ----")
    return "\n".join(line.rstrip() for line in lines)


def _note(spec: SweepSpec, row: dict) -> str:
    if row["status"] != "completed":
        return f"{row['status']}: {row['error']}"
    if row["violated"]:
        return "violates " + "; ".join(row["violated"])
    return f"no {spec.objective.metric}" if row["objective"] is None else ""


def _short(key: str) -> str:
    """regularizers.kl_to_base.weight -> kl_to_base.weight: enough to tell knobs apart."""
    return ".".join(key.split(".")[-2:])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
