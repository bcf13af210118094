"""The same search as a `wandb sweep` config (`<output_dir>/wandb_sweep.yaml`), for running the
sweep with W&B agents instead of `workbench sweep`.

The agent passes knobs as key=value arguments, which is exactly the override syntax of
`workbench train`. W&B ranks by one metric only; the spec's constraints stay with the local
leaderboard. Nothing here imports wandb or torch: `--dry-run` writes this file too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from workbench.formats.metrics import wandb_key
from workbench.io import atomic_path
from workbench.sweep.spec import Distribution, SweepSpec, is_eval_metric, recipe_path
from workbench.tracking.names import trainer_key


def wandb_metric(metric: str) -> str:
    """The W&B key a metric is logged under: eval_loss -> eval/loss, retention.x.y -> retention/x/y."""
    return wandb_key(metric) if is_eval_metric(metric) else trainer_key(metric)


def wandb_sweep_config(spec: SweepSpec, spec_path: Path) -> dict:
    """The sweep config: method, metric, parameters, and the command the agent runs."""
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
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(wandb_sweep_config(spec, spec_path), sort_keys=False))
