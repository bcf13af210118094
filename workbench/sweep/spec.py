"""A sweep spec: what `workbench sweep SPEC.yaml` searches over, validated, and the runs it makes.

A spec names a recipe, the knobs to vary (dotted recipe keys, as on the command line) and an
objective. Every run is an ordinary `workbench train` run under `<output_dir>/run-NN/`, optionally
followed by an eval suite.

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

Validating a spec (`--dry-run`) loads no model and no tracking: this module imports only the
config, formats, errors and io layers.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from workbench.config.suggest import did_you_mean
from workbench.config.recipe import Section, WandbSection, describe_error, load_recipe, read_yaml
from workbench.errors import UsageError
from workbench.formats.metrics import SECTIONS, examples, is_metric


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
        metrics = [self.objective.metric, *(c.metric for c in self.constraints)]
        for metric in metrics:
            _check_eval_metric_name(metric)
        needs_eval = [m for m in metrics if is_eval_metric(m)]
        if needs_eval and not self.eval_suite:
            raise ValueError(f"{needs_eval[0]} is an eval metric: set eval_suite to evaluate each run")
        return self


def is_eval_metric(metric: str) -> bool:
    """A results.json metric of the catalogue (retention.*, learning.*, ...) rather than a run.json
    `final` key (eval_loss, train_loss, ...)."""
    return is_metric(metric)


def _check_eval_metric_name(metric: str) -> None:
    """A name under a results section that the catalogue does not know is a typo: refuse it here,
    or the sweep would train every run and then find nothing to rank them on."""
    if metric.partition(".")[0] in SECTIONS and not is_metric(metric):
        raise ValueError(f"{metric} is not a results.json metric{did_you_mean(metric, examples())}")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec; bad input is one UsageError line naming the file and key."""
    path = Path(path)
    raw = read_yaml(path, kind="sweep spec")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise UsageError(f"{path}: {describe_error(exc, SweepSpec)}") from None
    return spec.model_copy(update={"name": spec.name or path.stem})


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
