"""The W&B runs of one fine-tune, and the list of them that run.json keeps.

A fine-tune is tracked as separate W&B runs in one group, told apart by job type: `train` (one
run id; a `--resume` rejoins it), then one `eval` run per `workbench eval` and one `gate` run per
`workbench gate`, each with an id of its own (docs/tracking.md, "One fine-tune, several runs").
Offline, wandb writes a folder per `wandb.init`, so run.json's `wandb.runs` lists every
(id, folder) pair the fine-tune wrote to: the list `wandb sync` needs, oldest first.

No wandb and no torch here: `workbench gate` reads the list without loading either.
"""

from __future__ import annotations

from pathlib import Path

from workbench.config.recipe import WandbSection
from workbench.errors import UsageError
from workbench.formats.run_record import is_held, read_run
from workbench.tracking.names import run_config, run_name, run_tags

FRAGMENT_KEYS = ("id", "name", "job_type", "mode", "dir")


def fragment(info: dict) -> dict:
    """What `wandb.runs` keeps of one started run (a `Tracker.info()`): id, name, job type, mode and
    the offline folder."""
    return {k: info.get(k) for k in FRAGMENT_KEYS}


def with_run(known: dict | None, info: dict) -> dict:
    """run.json's `wandb` record with one more run listed. A record written before the list existed
    names only its training run, which becomes the list's first entry."""
    known = dict(known or {})
    runs = list(known.get("runs") or ([fragment(known)] if known.get("id") else []))
    known["runs"] = [*runs, fragment(info)]
    return known


def training_record(run_dir: str | Path | None) -> dict:
    """A run's run.json as a dict, or {} when there is none (a bare adapter, a foreign file)."""
    if not run_dir:
        return {}
    try:
        return read_run(run_dir).model_dump()
    except UsageError:
        return {}


def note_run(run_dir: str | Path | None, info: dict) -> bool:
    """Add an eval or gate run to run.json's `wandb.runs`; True when written.

    Skipped while a live process writes the record (an eval of a checkpoint during training):
    its next write would lose the entry anyway, and two writers must not interleave."""
    if not run_dir or not info.get("id") or is_held(run_dir):
        return False
    try:
        record = read_run(run_dir)
    except UsageError:
        return False
    # a run trained without tracking and logged with --wandb gets the list alone, no training id
    record.wandb = with_run(record.wandb, info)
    record.write(run_dir)
    return True


def beside(record: dict, suffix: str) -> dict | None:
    """`Tracker.start` arguments for a run beside a fine-tune's training run (an eval or a gate
    run): the training run's group, config keys and tags, `run.train_id` naming it, and the name
    `<training run>-<suffix>`. None for a record with no recipe (a bare adapter)."""
    recipe = record.get("recipe")
    if not recipe:
        return None
    known = record.get("wandb") or {}
    section = WandbSection.model_validate(recipe.get("wandb") or {})
    return {"section": section, "name": f"{known.get('name') or run_name(recipe)}-{suffix}",
            "group": known.get("group") or section.group or recipe["name"], "tags": run_tags(recipe),
            "config": {**run_config(recipe, record), "run.train_id": known.get("id")}}
