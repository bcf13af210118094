"""W&B logging of `workbench eval` results.

Each tracked run's entries go into a new W&B run of job type `eval` in its training run's group,
with the training run's config keys and tags (never a rejoin of the training run: offline, that
writes a second folder under one id, which `wandb sync` may merge badly; docs/tracking.md). It
holds summary metrics (the scale-1 entry, under the catalogue's W&B keys: `retention/*`,
`overfit/*`, `learning/*`), one table per results section, the report's plots of this run's
entries only and results.json as an artifact; run.json lists the new run. With `--wandb` runs
trained without tracking and bare adapters get eval runs too.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

from workbench.config.recipe import WandbSection
from workbench.formats.metrics import CHANGES, SECTIONS, SIDES, wandb_key
from workbench.formats.results import Entry, Results
from workbench.io import fingerprint
from workbench.tracking.names import lineage
from workbench.tracking.runs import beside, note_run, training_record
from workbench.tracking.wandb_run import Tracker, warn

TABLE_COLUMNS = ["entry", "scale", "task", "metric", "base", "tuned", "change", "ci_low", "ci_high"]


def metric_rows(entry: Entry) -> dict[str, list[list]]:
    """An entry's metrics as table rows per section, one row per task and metric:
    [entry, scale, task, metric, base, tuned, change, ci_low, ci_high], the CI being the change's
    (or, for a metric with no base side, the value's)."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)  # stem -> side -> metric name
    for name in entry.metrics:
        stem, _, side = name.rpartition(".")
        if side in SIDES:
            groups[stem][side] = name
        else:
            groups[name]["value"] = name
    tables: dict[str, list[list]] = defaultdict(list)
    for stem, sides in groups.items():
        section, task, metric = _split(stem)
        change = next((sides[k] for k in (*CHANGES, "value") if k in sides), "")
        read = {at: entry.value(change, at) for at in ("value", "ci_low", "ci_high")}
        tables[SECTIONS.get(section, section)].append(
            [entry.name, entry.scale, task, metric, entry.value(sides.get("base", "")),
             entry.value(sides.get("tuned", "")), read["value"], read["ci_low"], read["ci_high"]])
    return tables


def _split(stem: str) -> tuple[str, str, str]:
    """retention.mc.arith.acc -> (retention, arith, acc); retention.general.kl -> (retention,
    general, kl); learning.val_loss -> (learning, target, val_loss)."""
    section, *rest = stem.split(".")
    if section == "retention" and rest[:1] == ["mc"]:
        rest = rest[1:]
    if section in ("retention", "calibration") and len(rest) > 1:
        return section, rest[0], ".".join(rest[1:])
    return section, "target", ".".join(rest)


def log_eval(results: Results | dict, results_path: Path, force: bool | None = None) -> None:
    """Log eval results (the file or its payload) to W&B: each run's entries into the W&B run its
    run.json names; with `force` (`--wandb`) also untracked runs and bare adapters, into new eval
    runs. force=False logs nothing."""
    if force is False:
        return
    try:
        _log_eval(Results.of(results, results_path), results_path, force)
    except Exception as exc:  # a run.json of another version, an odd entry: the results are on disk
        warn("eval logging", exc)


def _log_eval(results: Results, results_path: Path, force: bool | None) -> None:
    by_run: dict[str | None, list[Entry]] = defaultdict(list)
    for entry in results.entries:
        by_run[entry.run].append(entry)
    with tempfile.TemporaryDirectory() as scratch:
        for i, (run_dir, entries) in enumerate(by_run.items()):
            record = training_record(run_dir)
            if not force and not (record.get("wandb") or {}).get("id"):
                continue
            tracker = _eval_tracker(results, results_path, run_dir, record)
            if not tracker.active:
                continue
            info = tracker.info()
            plots = _report_plots(results.model_copy(update={"entries": entries}), Path(scratch) / f"run-{i}")
            _log_entries(tracker, entries, results, results_path, record, plots)
            note_run(run_dir, info)


def _eval_tracker(results: Results, results_path: Path, run_dir: str | None, record: dict) -> Tracker:
    """A new run of job type `eval` beside the training run (`runs.beside`), named
    `<training run>-eval`; for bare adapters a run named after the suite in group `eval`."""
    suite = results.suite.get("name")
    start = beside(record, "eval") or {
        "section": WandbSection(), "name": f"eval-{suite}-{fingerprint(results.entries[0].adapter)[:6]}",
        "group": "eval", "config": {}, "tags": None}
    start["config"]["eval.suite"] = suite
    directory = Path(run_dir) if run_dir else Path(results_path).parent
    return Tracker.start(start.pop("section"), **start, job_type="eval", directory=directory)


def _log_entries(tracker: Tracker, entries: list[Entry], results: Results, results_path: Path,
                 record: dict, plots: dict[str, Path]) -> None:
    """Summary metrics (the scale-1 entry), one table per section, the plots, results.json."""
    for entry in entries:
        if entry.scale == 1.0:
            tracker.summary({wandb_key(name): v for name in entry.metrics if (v := entry.value(name)) is not None})
    tables: dict[str, list[list]] = defaultdict(list)
    for entry in entries:
        for section, rows in metric_rows(entry).items():
            tables[section] += rows
    for section, rows in tables.items():
        tracker.table(f"eval/{section}", TABLE_COLUMNS, rows)
    if plots:
        tracker.images(plots)
    meta = {**lineage(record), "suite_fingerprint": results.fingerprint("suite"),
            "base_fingerprint": results.fingerprint("base")}
    name = tracker.info().get("name") or "eval"
    tracker.artifact(f"{name}-results", "eval-results", Path(results_path), meta)
    tracker.finish()


def _report_plots(results: Results, scratch: Path) -> dict[str, Path]:
    """The report's plots of these results alone (one run's entries: its loss curve, its ROC and
    reliability curves, the trade-off of its own points), keyed plots/<name>. Built from a copy of
    results.json that holds only those entries, since a report draws every run its entries name."""
    from workbench.report.build import build_report

    try:
        results.write(scratch / "results.json")
        build_report([scratch / "results.json"], scratch / "report")
    except Exception as exc:  # a plot that cannot be drawn must not cost the rest of the logging
        warn("report plots", exc)
        return {}
    return {f"plots/{p.stem}": p for p in sorted((scratch / "report" / "plots").glob("*.png"))}
