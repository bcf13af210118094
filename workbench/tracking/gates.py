"""W&B logging of `workbench gate`: the release decision where the runs are compared.

For each fine-tune whose checks the gate made, a run of job type `gate` in its training run's
group, with the training run's config keys and tags, holding `workbench.gate.decision()` over that
fine-tune's checks as summary keys and one table:

    gate/<policy>/passed            true when every check passed or was skipped
    gate/<policy>/counts/<status>   pass, fail, missing, skipped, and total
    gate/<policy>/verdict           the one-line verdict the gate prints
    gate/<policy>/checks            a table: entry, rule, metric, at, observed, threshold, status, why

By default only runs whose run.json names a W&B run are logged (as eval does); `--wandb` also
logs entries of untracked runs and bare adapters, `--no-wandb` nothing. Nothing here writes to
standard output, which `gate --json -` keeps for the JSON.
"""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from pathlib import Path

from workbench.config.recipe import WandbSection
from workbench.formats.results import Results
from workbench.tracking.runs import beside, note_run, training_record
from workbench.tracking.wandb_run import Tracker, warn

CHECK_COLUMNS = ["entry", "rule", "metric", "at", "observed", "threshold", "status", "why"]
STATUSES = ("pass", "fail", "missing", "skipped")


def gate_summary(outcome: dict) -> dict:
    """A `decision()` as W&B summary keys under `gate/<policy>/`."""
    root = f"gate/{outcome['policy']['name']}"
    return {f"{root}/passed": bool(outcome["passed"]), f"{root}/verdict": outcome["verdict"],
            **{f"{root}/counts/{status}": int(outcome["counts"][status]) for status in STATUSES},
            f"{root}/counts/total": len(outcome["checks"])}


def check_rows(outcome: dict) -> list[list]:
    """A `decision()`'s checks as table rows, in CHECK_COLUMNS order."""
    return [[check[column] for column in CHECK_COLUMNS] for check in outcome["checks"]]


def log_gate(results: Results, results_path: str | Path, policy, checks: list, force: bool | None = None) -> None:
    """Log the gate's outcome per fine-tune (see the module docstring); force=False logs nothing.
    Never raises and never writes to standard output."""
    if force is False:
        return
    try:
        with contextlib.redirect_stdout(sys.stderr):
            _log_gate(results, Path(results_path), policy, checks, force)
    except Exception as exc:  # a run.json of another version, an odd entry: the gate has decided anyway
        warn("gate logging", exc)


def _log_gate(results: Results, results_path: Path, policy, checks: list, force: bool | None) -> None:
    from workbench.gate import decision

    run_of = {entry.name: entry.run for entry in results.entries}
    by_run: dict[str | None, list] = defaultdict(list)
    for check in checks:
        by_run[run_of.get(check.entry)].append(check)
    for run_dir, run_checks in by_run.items():
        record = training_record(run_dir)
        if not force and not (record.get("wandb") or {}).get("id"):
            continue
        outcome = decision(run_checks, policy, results_path)
        tracker = _gate_tracker(policy.name, results_path, run_dir, record)
        if not tracker.active:
            continue
        info = tracker.info()
        tracker.summary(gate_summary(outcome))
        tracker.table(f"gate/{policy.name}/checks", CHECK_COLUMNS, check_rows(outcome))
        tracker.finish()
        note_run(run_dir, info)


def _gate_tracker(policy: str, results_path: Path, run_dir: str | None, record: dict) -> Tracker:
    """A new run of job type `gate` beside the training run (`runs.beside`), named
    `<training run>-gate-<policy>`; for bare adapters one named after the results file, in group `gate`."""
    start = beside(record, f"gate-{policy}") or {
        "section": WandbSection(), "name": f"gate-{policy}-{results_path.stem}", "group": "gate",
        "config": {}, "tags": None}
    start["config"].update({"gate.policy": policy, "gate.results": str(results_path)})
    directory = Path(run_dir) if run_dir else results_path.parent
    return Tracker.start(start.pop("section"), **start, job_type="gate", directory=directory)
