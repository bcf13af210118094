"""`run.json`: what `workbench train` writes about a run, and the one way every command reads it.

The record is written atomically at start (`status: running`), when a signal stops the run
(`interrupted`) and at the end (`completed`). Readers go through `read_run`, which turns a
missing, torn or foreign file into one line naming the file.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workbench.errors import UsageError, first_line
from workbench.io import write_json

SCHEMA_VERSION = 1
FILENAME = "run.json"
_UNTIL_SET = ("history", "final", "global_step", "adapter", "adapter_step", "selection", "resumed_from", "wandb")
Status = Literal["running", "completed", "interrupted", "failed"]


class RunRecord(BaseModel):
    """Schema version 1. Keys a later version adds are kept as they are (extra="allow")."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    status: Status = "running"
    recipe: dict[str, Any] = Field(description="The fully resolved recipe, every default filled in.")
    versions: dict[str, str] = Field(default_factory=dict,
                                     description="workbench, python, torch, transformers, peft, accelerate")
    world_size: int = Field(default=1, description="Data-parallel processes.")
    command: list[str] = Field(default_factory=list)
    model_fingerprint: str | None = Field(default=None, description="A hash of the base weights and config.")
    parameters: dict[str, int] = Field(default_factory=dict, description="trainable and total counts")
    data: dict[str, Any] = Field(default_factory=dict,
                                 description="n_train, n_val, n_replay, n_truncated, n_dropped_all_masked, "
                                 "n_completion_tokens, max_length, train_fingerprint")
    fisher: dict[str, Any] | None = Field(default=None, description="The Fisher's metadata, when EWC is on.")
    reference_cache: dict[str, Any] | None = Field(
        default=None, description="The KL top-k reference cache entry: path, top_k, positions, bytes, cached.")
    penalties: list[str] = Field(default_factory=list, description="The loss-side regularizers that are on.")
    history: list[dict[str, Any]] | None = Field(
        default=None, description="One record per logged step: loss, task_loss, each penalty and "
        "<name>_weighted (averaged over ranks), learning_rate, grad_norm, epoch, step; eval records with eval_loss.")
    final: dict[str, Any] | None = Field(default=None, description="Train metrics and the final eval_loss.")
    global_step: int | None = None
    adapter: str | None = Field(default=None, description="The adapter directory, relative to the run.")
    adapter_step: int | None = Field(default=None, description="The step the adapter was saved at, when "
                                     "train.select chose a checkpoint rather than the last step.")
    selection: dict[str, Any] | None = Field(
        default=None, description="Under train.select: metric, subject_to, step (null when no checkpoint met "
        "the bounds), reason, and each candidate checkpoint's values, `meets` and the bounds it `breaks`.")
    resumed_from: str | None = None
    wandb: dict[str, Any] | None = Field(default=None, description="The W&B run: id, project, entity, url.")

    @property
    def name(self) -> str:
        return str(self.recipe.get("name", ""))

    def write(self, run_dir: str | Path) -> Path:
        """Atomically; keys that only a finished, resumed or tracked run has are left out until set."""
        path = Path(run_dir) / FILENAME
        data = self.model_dump(mode="json")
        write_json(path, {k: v for k, v in data.items() if not (v is None and k in _UNTIL_SET)})
        return path


def run_path(path: str | Path) -> Path:
    """`DIR/run.json` for a run directory, the path itself for a file."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def read_run(path: str | Path) -> RunRecord:
    """The record of a run directory or run.json file, or a one-line UsageError naming the file."""
    path = run_path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no run.json (give a run directory written by `workbench train`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers JSON and UTF-8 decoding errors
        raise UsageError(f"{path}: not a readable run.json ({first_line(exc)})") from None
    if not isinstance(data, dict) or "recipe" not in data:
        raise UsageError(f"{path}: not a workbench run record (no \"recipe\")")
    if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise UsageError(f"{path}: schema_version {data.get('schema_version')!r}, this workbench reads "
                         f"{SCHEMA_VERSION}")
    try:
        return RunRecord.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise UsageError(f"{path}: {key}: {err['msg']}") from None


def versions() -> dict[str, str]:
    """The versions a record or a results file states, read from package metadata (no imports)."""
    out = {"python": platform.python_version()}
    for package in ("workbench", "torch", "transformers", "peft", "accelerate"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out
