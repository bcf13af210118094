"""Run the study's grid cell by cell (`make study`; the grid is scripts/grid_cells.py).

For each cell: train its rows (a run whose run.json says "completed" is kept), score them all with
the cell's suite (OSF's runs in a call of their own, into results_osf.json: PEFT holds adapters of
one method on a model), compare every family with training less, and copy results.json, compare.json,
compare.md and plan.json (the rows, the estimate and the time taken) into KEEP/<cell>/, the
folder the repository keeps; the runs themselves (adapters, checkpoints) stay under OUT. A cell
whose KEEP/<cell>/ holds a compare.json made from all its runnable rows is skipped, so a killed
grid resumes where it stopped. At the end, `workbench summarize` puts every kept cell in one table.
Before a cell it prints its estimate, after it the time taken; at the end both for the grid.

  CELLS="smollm2-unscramble gemma3-gsm8k"  only these cells (default: every cell, in order)
  ONLY="baseline lr_low"   only these rows of each cell (the reference rows must be among them)
  DRY_RUN=1                print the plan and the estimates; run nothing
  HEAVY=1                  also the rows too slow for 2 CPU cores (self-distillation on GSM8K)
  OUT=dir                  the runs (default runs/grid)
  KEEP=dir                 each cell's results and comparison (default study/grid)
  STEPS=N MAX_EXAMPLES=N   a short profile that checks the machinery, with SUITE=evals/x.yaml for
                           every cell; keep its KEEP out of study/ (its numbers mean nothing)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from grid_cells import CELLS, LANDING, RECIPES, Cell, Row, estimate, missing_key

from workbench.config.recipe import load_recipe
from workbench.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_METRICS = ("retention.general.ppl.ratio", "retention.general.kl")  # every cell has both


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def workbench(*args: str) -> None:
    """One workbench command, its output passed through; a failure ends the grid with its exit code."""
    print("$ workbench " + " ".join(args), flush=True)
    code = subprocess.call([sys.executable, "-m", "workbench", *args], cwd=ROOT)
    if code != 0:
        sys.exit(code)


def osf(row: Row) -> bool:
    return "lora.method=osf" in row.overrides


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status") == "completed"
    except (OSError, json.JSONDecodeError):
        return False


def profile_args() -> tuple[str, ...]:
    """The short profile's overrides, from STEPS and MAX_EXAMPLES (after the cell's own trim)."""
    args = []
    if os.environ.get("STEPS"):
        steps = int(os.environ["STEPS"])
        args += [f"train.max_steps={steps}", f"train.eval_steps={steps}", f"train.save_steps={max(1, steps // 2)}"]
    if os.environ.get("MAX_EXAMPLES"):
        args.append(f"data.max_examples={int(os.environ['MAX_EXAMPLES'])}")
    return tuple(args)


def train_args(cell: Cell, row: Row) -> list[str]:
    """Everything after the recipe on the row's `workbench train` line, in the order applied."""
    return [f"name={row.name}", f"family={row.family}", *cell.train_args, *profile_args(), *row.overrides]


def runnable(cell: Cell, only: set[str], heavy: bool) -> tuple[list[Row], list[tuple[Row, str]]]:
    """The rows this cell runs now, and the ones left out with why: pending rows, and rows of a method
    this version has no key for yet (LANDING). Any other row that does not load raises UsageError."""
    rows, left = [], []
    for row in cell.rows:
        if only and row.name not in only:
            continue
        missing = missing_key(row)
        if missing and missing not in LANDING:
            raise UsageError(f"row {row.name}: recipes have no key {missing}")
        why = (row.pending or (f"this version's recipes have no {missing}" if missing else "")
               or (row.heavy if not heavy else ""))
        if why:
            left.append((row, why))
            continue
        load_recipe(RECIPES / row.recipe, train_args(cell, row))
        rows.append(row)
    return rows, left


def done(kept: Path, rows: list[Row]) -> bool:
    try:
        plan = json.loads((kept / "plan.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (kept / "compare.json").is_file() and {r.name for r in rows} <= set(plan.get("rows", []))


def run_cell(cell: Cell, rows: list[Row], out: Path, kept: Path, suite: str) -> None:
    runs = [out / row.name for row in rows]
    workbench("assets", "--model", cell.model, "--suite", suite)
    for row, run_dir in zip(rows, runs):
        if completed(run_dir):
            print(f"== {cell.name}: train {row.name}: completed before, kept", flush=True)
            continue
        print(f"== {cell.name}: train {row.name}: recipes/{row.recipe} {' '.join(row.overrides)}", flush=True)
        workbench("train", f"recipes/{row.recipe}", *train_args(cell, row), "--output-dir", str(run_dir), "--resume")
    results, groups = [], {"results.json": [r for r in rows if not osf(r)], "results_osf.json": [r for r in rows if osf(r)]}
    for name, group in groups.items():
        if group:  # PEFT holds adapters of one method on a model: OSF's runs are scored in a call of their own
            results.append(out / name)
            workbench("eval", "--suite", suite, *[a for r in group for a in ("--run", str(out / r.name))],
                      "--out", str(results[-1]))
    workbench("compare", *map(str, results), "--forgetting", *cell.forgetting,
              "--out", str(out / "compare.json"), "--markdown", str(out / "compare.md"))
    kept.mkdir(parents=True, exist_ok=True)
    for path in [*results, out / "compare.json", out / "compare.md"]:
        shutil.copyfile(path, kept / path.name)


def summarize(keep: Path) -> None:
    cells = [f"{c.name}={keep / c.name / 'compare.json'}" for c in CELLS if (keep / c.name / "compare.json").is_file()]
    if len(cells) < 2:
        return
    metrics = [a for m in SUMMARY_METRICS for a in ("--metric", m)]
    workbench("summarize", *cells, *metrics, "--out", str(keep / "summary.json"), "--markdown", str(keep / "summary.md"))


def plan_line(cell: Cell, row: Row, out: Path) -> str:
    state = "completed, kept" if completed(out / row.name) else "to train"
    return f"   {row.name:<16} {state:<16} recipes/{row.recipe} {' '.join(train_args(cell, row)[2:])}"


def main() -> int:
    names = os.environ.get("CELLS", "").split()
    unknown = [n for n in names if n not in {c.name for c in CELLS}]
    if unknown:
        print(f"error: CELLS: no cell {', '.join(unknown)}; the cells: {', '.join(c.name for c in CELLS)}",
              file=sys.stderr)
        return 2
    only, dry, heavy = (set(os.environ.get("ONLY", "").split()), os.environ.get("DRY_RUN", "") not in ("", "0"),
                        os.environ.get("HEAVY", "") not in ("", "0"))
    out_root, keep = ROOT / os.environ.get("OUT", "runs/grid"), ROOT / os.environ.get("KEEP", "study/grid")
    total_estimate, total_actual, start, pools = 0.0, 0.0, time.monotonic(), set()
    for cell in [c for c in CELLS if not names or c.name in names]:
        suite, out, kept = os.environ.get("SUITE") or cell.suite, out_root / cell.name, keep / cell.name
        try:
            rows, left = runnable(cell, only, heavy)
        except UsageError as exc:
            print(f"error: {cell.name}: {exc}", file=sys.stderr)
            return 2
        for row, why in left:
            print(f"== {cell.name}: {row.name} left out: {why}")
        if done(kept, rows):
            print(f"== {cell.name}: done before ({kept / 'compare.json'}), skipped")
            continue
        todo = [r for r in rows if not completed(out / r.name)]
        est = estimate(cell, rows, todo, profile_args(), pools)
        total_estimate += est.total
        print(f"== {cell.name}: {len(rows)} runs ({len(todo)} to train), suite {suite}; estimated "
              f"{minutes(est.total)} ({est.describe()})", flush=True)
        if dry:
            print("\n".join(plan_line(cell, row, out) for row in rows))
            continue
        cell_start = time.monotonic()
        run_cell(cell, rows, out, kept, suite)
        actual = time.monotonic() - cell_start
        total_actual += actual
        plan = {"cell": cell.name, "suite": suite, "rows": [r.name for r in rows],
                "left_out": {r.name: why for r, why in left}, "estimated_s": round(est.total),
                "actual_s": round(actual), "trained_now": [r.name for r in todo]}
        (kept / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        print(f"== {cell.name}: done in {minutes(actual)} (estimated {minutes(est.total)})", flush=True)
    if not dry:
        summarize(keep)
    print(f"== grid: estimated {minutes(total_estimate)}"
          + ("" if dry else f", took {minutes(time.monotonic() - start)} ({minutes(total_actual)} in cells)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
