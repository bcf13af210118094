"""`workbench sweep SPEC.yaml`: run every trial of a spec, then print and write the leaderboard.

Runs go one after another in this process, or `--parallel N` spawned processes at once, each
with its output in `<run dir>/train.log`. With tracking on, all runs share one W&B group. The
sweep also leaves a `wandb_sweep.yaml` for `wandb sweep`. Training, evals and tracking are
imported inside `run_job` only, so `--dry-run` validates a spec without loading a model stack.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from workbench.config.recipe import load_recipe
from workbench.errors import Interrupted, RunFailed, UsageError
from workbench.io import write_json
from workbench.sweep.leaderboard import format_leaderboard, leaderboard
from workbench.sweep.spec import Trial, jobs, load_spec, trials
from workbench.sweep.wandb_sweep import write_wandb_sweep


def run_sweep(spec_path: str | Path, parallel: int = 1, wandb: bool = False, output_dir: Path | None = None,
              dry_run: bool = False) -> int:
    """Validate every run, run them, print and write the leaderboard; exit 1 if none completed."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    if parallel < 1:
        raise UsageError(f"--parallel {parallel}: needs at least 1")
    out = Path(output_dir or spec.output_dir or f"runs/sweeps/{spec.name}")
    runs = trials(spec, out)
    job_list = jobs(spec, spec_path, runs, wandb)
    write_wandb_sweep(spec, spec_path, out / "wandb_sweep.yaml")
    print(f"sweep {spec.name}: {len(runs)} runs ({spec.method}) under {out}")
    if dry_run:
        for trial, job in zip(runs, job_list):
            print(f"  {trial.name}: workbench train {job['recipe']} {' '.join(job['overrides'])}")
        print(f"wandb sweep config: {out / 'wandb_sweep.yaml'}")
        return 0
    execute(runs, job_list, parallel)
    rows = leaderboard(spec, runs)
    write_json(out / "leaderboard.json", {
        "sweep": spec.name, "spec": str(spec_path), "method": spec.method,
        "objective": spec.objective.model_dump(), "constraints": [c.model_dump() for c in spec.constraints],
        "wandb_group": _group(job_list[0]) if job_list else None, "runs": rows})
    print(format_leaderboard(spec, rows))
    print(f"leaderboard: {out / 'leaderboard.json'}\nwandb sweep config: {out / 'wandb_sweep.yaml'}")
    if not any(r["status"] == "completed" for r in rows):
        raise RunFailed(f"sweep {spec.name}: no run completed (logs under {out})")
    return 0


def execute(runs: list[Trial], job_list: list[dict], parallel: int) -> None:
    """Run every job, in this process or in `parallel` spawned processes; fill in each status."""
    def done(trial: Trial, outcome: dict, count: int) -> None:
        trial.status, trial.error = outcome["status"], outcome.get("error")
        knobs = ", ".join(f"{k}={v}" for k, v in trial.knobs.items())
        note = f": {trial.error}" if trial.error else ""
        print(f"sweep: {trial.name} {trial.status} ({knobs}) [{count}/{len(runs)}]{note}", flush=True)

    if parallel <= 1:
        for count, (trial, job) in enumerate(zip(runs, job_list), 1):
            print(f"sweep: {trial.name} starting", flush=True)
            done(trial, run_job(job), count)
        return
    threads = max(1, (os.cpu_count() or 1) // parallel)
    context = multiprocessing.get_context("spawn")  # no forked copies of torch or wandb state
    with ProcessPoolExecutor(max_workers=parallel, mp_context=context) as pool:
        futures = {pool.submit(_run_job_quietly, job, threads): trial for trial, job in zip(runs, job_list)}
        print(f"sweep: {len(runs)} runs, {parallel} at a time; logs in each run's train.log", flush=True)
        for count, future in enumerate(as_completed(futures), 1):
            try:
                outcome = future.result()
            except Exception as exc:  # the worker itself died (killed, out of memory)
                outcome = {"status": "failed", "error": f"worker: {type(exc).__name__}: {exc}"}
            done(futures[future], outcome, count)


def run_job(job: dict) -> dict:
    """Train one run, then evaluate it when the sweep has a suite; returns its status.

    A run that fails (bad data, divergence, a bug) is recorded, not raised: one bad corner of a
    grid must not cost the others. An interrupt stops the whole sweep.
    """
    from workbench.evals.evaluate import run_eval
    from workbench.tracking.evals import log_eval
    from workbench.tracking.names import enable
    from workbench.tracking.training import TrainingObserver
    from workbench.training.run import train

    try:
        recipe = enable(load_recipe(job["recipe"], job["overrides"]), job["recipe"], on=job["wandb"])
        run_dir = train(recipe, Path(job["output_dir"]), observer=TrainingObserver())
        if job["eval_suite"]:
            results = run_eval(job["eval_suite"], runs=[run_dir], out=run_dir / "results.json")
            log_eval(results, run_dir / "results.json")
        return {"status": "completed"}
    except (KeyboardInterrupt, Interrupted):
        raise
    except (UsageError, RunFailed) as exc:
        return {"status": "failed", "error": str(exc)}
    except Exception as exc:
        traceback.print_exc()
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _run_job_quietly(job: dict, threads: int) -> dict:
    """A worker process's run: its output goes to <run dir>/train.log, its cores are shared."""
    import torch

    torch.set_num_threads(threads)
    log = Path(job["output_dir"]) / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        return run_job(job)


def _group(job: dict) -> str | None:
    """The W&B group the runs were given, when tracked."""
    if not job["wandb"]:
        return None
    found = [o.partition("=")[2] for o in job["overrides"] if o.startswith("wandb.group=")]
    return json.loads(found[-1]) if found else None
