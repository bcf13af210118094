"""`workbench sweep SPEC.yaml`: grid or random search over recipe overrides, and a leaderboard.

A spec names a recipe, the knobs to vary (dotted recipe keys, as on the command line) and an
objective. Every run is an ordinary `workbench train` run under `<output_dir>/run-NN/`, optionally
followed by an eval suite; runs go one after another in this process, or `--parallel N` local
processes at once. With tracking on, all runs share one W&B group. The sweep ends with a
leaderboard ranked by the objective (feasible runs first, under the spec's constraints), printed
and written as `leaderboard.json`, and leaves a `wandb_sweep.yaml` for `wandb sweep`.

    name: kl_x_ewc                      # W&B group and output folder; default: the file's stem
    recipe: ../tiny.yaml                # relative to this file
    overrides: [train.max_steps=20]     # fixed, applied to every run
    method: grid                        # or random (needs num_runs; seed)
    parameters:
      regularizers.kl_to_base.weight: [0.0, 0.5]
      train.learning_rate: {distribution: log_uniform, min: 1.0e-4, max: 1.0e-2}   # random only
    objective: {metric: eval_loss, goal: minimize}   # run.json `final`, or a results.json metric
    constraints: [{metric: retention.general.ppl.ratio, max: 1.05}]
    eval_suite: ../../evals/tiny.yaml   # evaluate each run (needed for results.json metrics)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import multiprocessing
import os
import random
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from workbench.errors import Interrupted, RunFailed, UsageError
from workbench.io import write_json
from workbench.config.recipe import Section, WandbSection, read_yaml, describe_error, load_recipe
from workbench.tracking.core import PREFIXES, trainer_key, wandb_key


class Distribution(Section):
    """One knob: a list of values (grid or random), or a range to draw from (random only)."""

    values: list[Any] | None = None
    distribution: Literal["uniform", "log_uniform", "int_uniform"] | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Distribution":
        if (self.values is None) == (self.distribution is None):
            raise ValueError("give either values: [...] or a distribution with min and max")
        if self.values is not None and not self.values:
            raise ValueError("values is empty")
        if self.distribution and (self.min is None or self.max is None or self.min >= self.max):
            raise ValueError(f"distribution {self.distribution} needs min < max")
        if self.distribution == "log_uniform" and self.min <= 0:
            raise ValueError("log_uniform needs min > 0")
        return self

    def sample(self, rng: random.Random) -> Any:
        if self.values is not None:
            return rng.choice(self.values)
        if self.distribution == "int_uniform":
            return rng.randint(int(self.min), int(self.max))
        if self.distribution == "log_uniform":
            return math.exp(rng.uniform(math.log(self.min), math.log(self.max)))
        return rng.uniform(self.min, self.max)


class Objective(Section):
    metric: str = Field(default="eval_loss", description="run.json `final` key or results.json metric.")
    goal: Literal["minimize", "maximize"] = "minimize"


class Constraint(Section):
    """A bound a run must meet to be ranked, e.g. a forgetting bound."""

    metric: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounded(self) -> "Constraint":
        if self.min is None and self.max is None:
            raise ValueError(f"constraint on {self.metric} needs min or max")
        return self

    def holds(self, value: float | None) -> bool:
        return value is not None and (self.min is None or value >= self.min) and (
            self.max is None or value <= self.max)

    def __str__(self) -> str:
        bounds = [f"{op} {bound:g}" for op, bound in ((">=", self.min), ("<=", self.max)) if bound is not None]
        return f"{self.metric} {' and '.join(bounds)}"


class SweepSpec(Section):
    name: str | None = None
    recipe: str
    method: Literal["grid", "random"] = "grid"
    num_runs: int | None = Field(default=None, ge=1, description="random search: how many runs.")
    seed: int = 0
    overrides: list[str] = []
    parameters: dict[str, Distribution] = Field(min_length=1)
    objective: Objective = Objective()
    constraints: list[Constraint] = []
    eval_suite: str | None = None
    output_dir: str | None = Field(default=None, description="Default: runs/sweeps/<name>.")
    wandb: WandbSection | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _lists_are_values(cls, parameters):
        if not isinstance(parameters, dict):
            return parameters
        return {k: {"values": v} if isinstance(v, list) else v for k, v in parameters.items()}

    @model_validator(mode="after")
    def _consistent(self) -> "SweepSpec":
        if self.method == "grid":
            ranged = [k for k, d in self.parameters.items() if d.values is None]
            if ranged:
                raise ValueError(f"parameters.{ranged[0]}: grid search needs a list of values")
            if self.num_runs is not None:
                raise ValueError("num_runs: only for method random (a grid runs every combination)")
        elif self.num_runs is None:
            raise ValueError("num_runs: method random needs the number of runs")
        needs_eval = [m for m in [self.objective.metric, *(c.metric for c in self.constraints)]
                      if is_eval_metric(m)]
        if needs_eval and not self.eval_suite:
            raise ValueError(f"{needs_eval[0]} is an eval metric: set eval_suite to evaluate each run")
        return self


def is_eval_metric(metric: str) -> bool:
    """A results.json metric (retention.*, learning.*, ...) rather than a run.json `final` key."""
    return "." in metric and metric.split(".")[0] in PREFIXES


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec; bad input is one UsageError line naming the file and key."""
    path = Path(path)
    raw = read_yaml(path, kind="sweep spec")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise UsageError(f"{path}: {describe_error(exc, SweepSpec)}") from None
    return spec.model_copy(update={"name": spec.name or path.stem})


# ---------------------------------------------------------------- the runs


@dataclass
class Trial:
    """One run of the sweep: its knob values and where it writes."""

    index: int
    knobs: dict[str, Any]
    output_dir: Path
    status: str = "pending"
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.output_dir.name

    def knob_overrides(self) -> list[str]:
        return [f"{key}={json.dumps(value)}" for key, value in self.knobs.items()]


def trials(spec: SweepSpec, output_dir: Path) -> list[Trial]:
    """Every combination (grid), or num_runs draws from a seeded generator (random)."""
    keys = list(spec.parameters)
    if spec.method == "grid":
        combos = itertools.product(*(spec.parameters[k].values for k in keys))
    else:
        rng = random.Random(spec.seed)
        combos = ([spec.parameters[k].sample(rng) for k in keys] for _ in range(spec.num_runs))
    return [Trial(i, dict(zip(keys, combo)), output_dir / f"run-{i:02d}") for i, combo in enumerate(combos)]


def recipe_path(spec: SweepSpec, spec_path: Path) -> Path:
    """Paths in a spec are relative to the spec file, as `extends:` is in a recipe."""
    return Path(os.path.normpath(spec_path.parent / spec.recipe))


def tracking_overrides(spec: SweepSpec, base_tags: list[str]) -> list[str]:
    """The wandb section every run gets: the spec's settings, the sweep as group and a tag."""
    settings = spec.wandb.model_dump(exclude_unset=True) if spec.wandb else {}
    settings.setdefault("group", spec.name)
    settings["tags"] = [*settings.get("tags", base_tags), f"sweep:{spec.name}"]
    return [f"wandb.{key}={json.dumps(value)}" for key, value in settings.items()]


def jobs(spec: SweepSpec, spec_path: Path, runs: list[Trial], wandb: bool) -> list[dict]:
    """One plain dict per run (it crosses to worker processes): every recipe validated here, so
    a bad knob stops the sweep before any run starts."""
    path = recipe_path(spec, spec_path)
    base = _load(spec_path, path, spec.overrides)
    tracked = wandb or spec.wandb is not None or base.wandb is not None
    fixed = [*spec.overrides, *(tracking_overrides(spec, base.wandb.tags if base.wandb else []) if tracked else [])]
    out = []
    for trial in runs:
        overrides = [*fixed, *trial.knob_overrides(), f"train.output_dir={json.dumps(str(trial.output_dir))}"]
        _load(spec_path, path, overrides)
        suite = os.path.normpath(spec_path.parent / spec.eval_suite) if spec.eval_suite else None
        out.append({"recipe": str(path), "overrides": overrides, "wandb": tracked, "eval_suite": suite,
                    "output_dir": str(trial.output_dir)})
    return out


def _load(spec_path: Path, path: Path, overrides: list[str]):
    try:
        return load_recipe(path, overrides)
    except UsageError as exc:
        raise UsageError(f"{spec_path}: {exc}") from None


def run_job(job: dict) -> dict:
    """Train one run, then evaluate it when the sweep has a suite; returns its status.

    A run that fails (bad data, divergence, a bug) is recorded, not raised: one bad corner of a
    grid must not cost the others. An interrupt stops the whole sweep.
    """
    from workbench.evals.evaluate import run_eval
    from workbench.training.run import train
    from workbench.tracking.core import TrainingObserver, enable, log_eval

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


# ---------------------------------------------------------------- leaderboard


def run_metrics(run_dir: Path) -> dict[str, float]:
    """What a run can be ranked on: run.json `final` (eval_loss, train_loss, ...) and, when it
    was evaluated, the metrics of its scale-1 results entry."""
    metrics: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        final = json.loads((run_dir / "run.json").read_text()).get("final") or {}
        metrics.update({k: float(v) for k, v in final.items() if _finite(v)})
    with contextlib.suppress(OSError, ValueError):
        entries = json.loads((run_dir / "results.json").read_text())["entries"]
        entry = next(e for e in entries if float(e.get("scale", 1.0)) == 1.0)
        metrics.update({k: float(m["value"]) for k, m in entry["metrics"].items() if _finite(m.get("value"))})
    return metrics


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def leaderboard(spec: SweepSpec, runs: list[Trial]) -> list[dict]:
    """One row per run, best first: completed runs meeting every constraint, by the objective;
    then runs that violate a constraint or lack the objective; then failed runs. Only the first
    group gets a rank."""
    rows = []
    for trial in runs:
        metrics = run_metrics(trial.output_dir)
        value = metrics.get(spec.objective.metric)
        violated = [str(c) for c in spec.constraints if not c.holds(metrics.get(c.metric))]
        rows.append({"run": trial.name, "run_dir": str(trial.output_dir), "status": trial.status,
                     "error": trial.error, "knobs": trial.knobs, "objective": value,
                     "constraints": {c.metric: metrics.get(c.metric) for c in spec.constraints},
                     "feasible": trial.status == "completed" and not violated and value is not None,
                     "violated": violated, "wandb": _wandb_info(trial.output_dir)})
    sign = 1.0 if spec.objective.goal == "minimize" else -1.0
    rows.sort(key=lambda r: (r["status"] != "completed", not r["feasible"],
                             sign * r["objective"] if r["objective"] is not None else math.inf))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank if row["feasible"] else None
    return rows


def _wandb_info(run_dir: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run_dir / "run.json").read_text()).get("wandb")
    return None


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


# ---------------------------------------------------------------- wandb sweep YAML


def wandb_metric(metric: str) -> str:
    """The W&B key a metric is logged under: eval_loss -> eval/loss, retention.x.y -> retention/x/y."""
    return wandb_key(metric) if is_eval_metric(metric) else trainer_key(metric)


def wandb_sweep_config(spec: SweepSpec, spec_path: Path) -> dict:
    """The same search as a `wandb sweep` config: the agent passes knobs as key=value arguments,
    which is exactly the override syntax of `workbench train`."""
    config: dict[str, Any] = {"name": spec.name, "program": "workbench", "method": spec.method,
                              "metric": {"name": wandb_metric(spec.objective.metric), "goal": spec.objective.goal},
                              "parameters": {k: _wandb_parameter(d) for k, d in spec.parameters.items()}}
    if spec.method == "random":
        config["run_cap"] = spec.num_runs
    for key in ("project", "entity"):
        if spec.wandb is not None and getattr(spec.wandb, key) and key in spec.wandb.model_fields_set:
            config[key] = getattr(spec.wandb, key)
    group = spec.wandb.group if spec.wandb and spec.wandb.group else spec.name
    config["command"] = ["${env}", "workbench", "train", str(recipe_path(spec, spec_path)), *spec.overrides,
                         f"wandb.group={group}", "--wandb", "${args_no_hyphens}"]
    return config


def _wandb_parameter(d: Distribution) -> dict:
    if d.values is not None:
        return {"values": list(d.values)}
    name = {"log_uniform": "log_uniform_values"}.get(d.distribution, d.distribution)
    cast = int if d.distribution == "int_uniform" else float
    return {"distribution": name, "min": cast(d.min), "max": cast(d.max)}


def write_wandb_sweep(spec: SweepSpec, spec_path: Path, path: Path) -> None:
    header = (f"# W&B sweep for {spec_path}: `wandb sweep {path}`, then `wandb agent <sweep id>`.\n"
              "# W&B ranks by `metric` only; the spec's constraints are applied by the local leaderboard.\n")
    if spec.eval_suite:
        header += "# The agent runs `workbench train` only: eval metrics need `workbench eval` afterwards.\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(wandb_sweep_config(spec, spec_path), sort_keys=False))


# ---------------------------------------------------------------- the command


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


def _group(job: dict) -> str | None:
    """The W&B group the runs were given, when tracked."""
    if not job["wandb"]:
        return None
    found = [o.partition("=")[2] for o in job["overrides"] if o.startswith("wandb.group=")]
    return json.loads(found[-1]) if found else None

