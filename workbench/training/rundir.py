"""A run directory holds one run: what `workbench train` does with what it finds there.

A run's identity is its fingerprint (`RunRecord.identity`: the resolved recipe and the base
weights), recorded in run.json and in every checkpoint's manifest. A fresh run into a directory
that holds another run is refused; one that holds an earlier attempt of the same run starts over.
`--resume` continues the run's own newest checkpoint that loads, passing over (and naming) any
that is damaged or another run's, and starts from step 0 when there is none yet.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from workbench.config.recipe import Recipe, resolved
from workbench.distributed import is_main_process
from workbench.errors import UsageError
from workbench.formats.integrity import manifest_run
from workbench.formats.run_record import RunRecord, read_run, recipe_changes
from workbench.training.faults import checkpoints, latest_checkpoint


def previous_run(recipe: Recipe, output_dir: Path, resume: bool) -> RunRecord | None:
    """The run record already in `output_dir`, checked before any model loads: a directory holds
    one run, so a record of another recipe is refused, with or without --resume."""
    if not (output_dir / "run.json").exists():
        return None
    started = read_run(output_dir)
    changed = recipe_changes(started.recipe, resolved(recipe))
    if changed and resume:
        raise UsageError(f"{output_dir}: the recipe changed since the run started (section "
                         f"{', '.join(changed)}); resume needs the same recipe")
    if changed:
        raise UsageError(f"{output_dir}: holds another run ({_describe(started)}; the recipe differs in section "
                         f"{', '.join(changed)}): give another --output-dir, or remove {output_dir} to start over")
    return started


def _describe(record: RunRecord) -> str:
    step = f", step {record.global_step}" if record.global_step is not None else ""
    return f"recipe '{record.name}', {record.status}{step}"


def check_base(output_dir: Path, started: RunRecord | None, record: RunRecord, resume: bool) -> None:
    """The same recipe over other base weights (the model directory's files replaced) is another run."""
    if started is None or started.model_fingerprint in (None, record.model_fingerprint):
        return
    what = (f"the base model changed since the run started (fingerprint {started.model_fingerprint}, now "
            f"{record.model_fingerprint})")
    raise UsageError(f"{output_dir}: {what}; " + ("resume needs the same base" if resume else
                     f"give another --output-dir, or remove {output_dir} to start over"))


def resume_point(output_dir: Path, record: RunRecord) -> Path | None:
    """The run's own newest checkpoint that loads, or None when it has none yet (then the run
    starts from step 0: a user who resumes wants the run finished). Each newer checkpoint that is
    damaged or another run's is named and skipped; when all are, nothing is resumed."""
    skipped: list[tuple[Path, str]] = []
    checkpoint = latest_checkpoint(output_dir, skipped, record.identity)
    if checkpoint is None and skipped:
        raise UsageError(f"{output_dir}: no checkpoint loads: "
                         + "; ".join(f"{path.name}: {why}" for path, why in skipped))
    if is_main_process():
        for path, why in skipped:
            print(f"resume: skipping {path.name}: {why}")
        if checkpoint is None:
            print(f"resume: no checkpoint in {output_dir / 'checkpoints'} yet; starting from step 0")
    return checkpoint


def start_over(output_dir: Path, started: RunRecord | None, record: RunRecord) -> None:
    """A fresh run into a directory that holds an earlier attempt of the same run removes that
    attempt's checkpoints (the new run writes the same steps again; left there, a later --resume
    could mix the two) and says so. Checkpoints of another run are refused, never removed."""
    found = checkpoints(output_dir)
    owners = {path: manifest_run(path) for path in found}
    # a checkpoint that names no run (cut before its manifest, or an older workbench's) is taken
    # as this run's when the directory's run.json is this run's
    foreign = [path for path, owner in owners.items()
               if owner != record.identity and (owner is not None or started is None)]
    if foreign:
        raise UsageError(f"{output_dir}: holds another run's checkpoints ({', '.join(p.name for p in foreign)}): "
                         f"give another --output-dir, or remove {output_dir} to start over")
    if is_main_process() and (found or started is not None):
        earlier = f"{_describe(started)}" if started else "checkpoints only"
        removed = f"; removing {', '.join(p.name for p in found)}" if found else ""
        print(f"train: {output_dir} holds an earlier attempt of this run ({earlier}); starting over from step 0"
              f"{removed} (--resume continues it instead)")
        for path in found:
            shutil.rmtree(path)
