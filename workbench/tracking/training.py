"""W&B tracking of a training run: one W&B run per `workbench train` (job type `train`).

Its config is the resolved recipe flattened to dotted keys, every penalty present (weight 0 when
off), so grouping and parallel-coordinates views work per regularizer knob; its history every Trainer log record (each loss term, learning
rate, gradient norm) plus tokens/s, and its artifacts the adapter and the Fisher. The W&B id goes
into run.json with the run's folder, so that `--resume` rejoins it and `workbench eval` and
`workbench gate` log runs of their own beside it, with the same config and group.
"""

from __future__ import annotations

import time
from pathlib import Path

from transformers import TrainerCallback

from workbench.config.recipe import Recipe, resolved
from workbench.distributed import is_main_process
from workbench.errors import UsageError
from workbench.formats.run_record import RunRecord, read_run
from workbench.tracking.names import lineage, run_config, run_name, run_tags, trainer_key
from workbench.tracking.runs import with_run
from workbench.tracking.wandb_run import Tracker


class TrackingCallback(TrainerCallback):
    """Sends every key of every Trainer log record to W&B (loss terms, learning rate, gradient
    norm, eval loss), plus tokens/s over the steps since the previous record."""

    STEP = "train/global_step"

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.tracker.define_step(self.STEP)
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_evaluate(self, args, state, control, **kwargs):
        # restart the clock: time spent evaluating is not training throughput
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.tracker.active or not logs:
            return
        metrics = {trainer_key(k): v for k, v in logs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "loss" in logs and self._last is not None:
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            if now > self._last[0] and tokens > self._last[1]:
                metrics["train/tokens_per_second"] = (tokens - self._last[1]) / (now - self._last[0])
            self._last = (now, tokens)
        self.tracker.log({**metrics, self.STEP: state.global_step})


def start_training(recipe: Recipe, trainer, output_dir: Path, record: RunRecord, resume: bool = False) -> Tracker:
    """Hook tracking into a built trainer, on every rank; start the W&B run on rank 0 only.

    Token counting is switched on (on every rank, since the Trainer gathers the counts) whenever
    the recipe has tracking on; the W&B id goes into `record` (run.json), and a resumed run
    rejoins the W&B run its run.json names.
    """
    if recipe.wandb is None:
        return Tracker()
    trainer.args.include_num_input_tokens_seen = "non_padding"
    if not is_main_process():
        return Tracker()
    previous = _previous_record(output_dir) if resume else {}
    data = resolved(recipe)
    tracker = Tracker.start(recipe.wandb, name=run_name(recipe), group=recipe.wandb.group or recipe.name,
                            config=run_config(data, record.model_dump()), job_type="train",
                            directory=output_dir, run_id=previous.get("id"), tags=run_tags(data))
    trainer.add_callback(TrackingCallback(tracker))
    if tracker.active:
        # the training run's id on top (what --resume, eval and gate read), every folder in `runs`
        info = tracker.info()
        record.wandb = {**info, "runs": with_run(previous, info)["runs"]}
    return tracker


def _previous_record(output_dir: Path) -> dict:
    """The `wandb` record of the run.json a `--resume` continues: its id and its list of runs."""
    try:
        return dict(read_run(output_dir).wandb or {})
    except UsageError:
        return {}


def finish_training(tracker: Tracker, output_dir: Path, record: RunRecord, exit_code: int = 0) -> None:
    """Log the adapter and the Fisher as artifacts, with their lineage, and close the run."""
    if not tracker.active:
        return
    if exit_code:
        tracker.finish(exit_code=exit_code)
        return
    record = record.model_dump()
    name = run_name(record["recipe"])
    meta = lineage(record)
    tracker.artifact(f"{name}-adapter", "model", output_dir / record.get("adapter", "adapter"), meta)
    fisher = record.get("fisher") or {}
    if fisher.get("path") and Path(fisher["path"]).is_file():
        tracker.artifact(f"{name}-fisher", "fisher", Path(fisher["path"]),
                         {**meta, **{k: v for k, v in fisher.items() if k != "path"}})
    tracker.finish()


class TrainingObserver:
    """W&B tracking of a training run, as `training.run.train` expects its observer."""

    def start(self, recipe: Recipe, trainer, output_dir: Path, record: RunRecord, resume: bool) -> Tracker:
        return start_training(recipe, trainer, output_dir, record, resume)

    def finish(self, tracker: Tracker, output_dir: Path, record: RunRecord, exit_code: int = 0) -> None:
        finish_training(tracker, output_dir, record, exit_code)
