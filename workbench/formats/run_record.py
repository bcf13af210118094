"""`run.json`: what `workbench train` writes about a run, and the one way every command reads it.

The record is written atomically at start (`status: running`), when a signal stops the run
(`interrupted`), when an error escapes training (`failed`, with a one-line `reason`) and at the
end (`completed`). A process killed outright (SIGKILL, a lost node) cannot write anything, so the
writer also holds an exclusive lock on `run.lock` next to it for as long as it runs; the kernel
releases the lock when the process dies, however it dies. `run_state` reads `running` as
`stale` when no process holds the lock. Readers go through `read_run`, which turns a missing,
torn or foreign file into one line naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import socket
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from workbench.errors import UsageError
from workbench.formats.schema import parsed
from workbench.io import fingerprint, read_json, write_json, writing

SCHEMA_VERSION = 1
FILENAME = "run.json"
LOCK = "run.lock"
_UNTIL_SET = ("history", "final", "global_step", "adapter", "adapter_step", "selection", "resumed_from", "wandb",
              "reason")
Status = Literal["running", "completed", "interrupted", "failed"]


def _writer() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


class RunRecord(BaseModel):
    """Schema version 1. Keys a later version adds are kept as they are (extra="allow")."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    status: Status = "running"
    reason: str | None = Field(default=None, description="Why a run is failed or interrupted, one line.")
    writer: dict[str, Any] = Field(default_factory=_writer,
                                   description="pid and host of the process that writes the record")
    recipe: dict[str, Any] = Field(description="The fully resolved recipe, every default filled in.")
    versions: dict[str, str] = Field(default_factory=dict,
                                     description="workbench, python, torch, transformers, peft, accelerate")
    world_size: int = Field(default=1, description="Data-parallel processes.")
    command: list[str] = Field(default_factory=list)
    model_fingerprint: str | None = Field(default=None, description="A hash of the base weights and config.")
    parameters: dict[str, int] = Field(default_factory=dict, description="trainable and total counts")
    data: dict[str, Any] = Field(default_factory=dict,
                                 description="n_train, n_val, n_replay, n_truncated, n_dropped_all_masked, "
                                 "n_completion_tokens, max_length, train_fingerprint; base_replay and "
                                 "self_distill (rewrites kept and dropped, the cache entry) when on")
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
    wandb: dict[str, Any] | None = Field(default=None, description="The training W&B run (id, project, entity, url, "
                                          "group) and `runs`: every run and offline folder the fine-tune wrote to.")

    @property
    def name(self) -> str:
        return str(self.recipe.get("name", ""))

    @property
    def identity(self) -> str:
        """The run's fingerprint: its resolved recipe and its base. Every checkpoint's manifest
        records it, so a run directory's checkpoints are known to be this run's before one loads."""
        return run_identity(self.recipe, self.model_fingerprint)

    def write(self, run_dir: str | Path) -> Path:
        """Atomically; keys that only a finished, resumed or tracked run has are left out until set."""
        path = Path(run_dir) / FILENAME
        data = self.model_dump(mode="json")
        write_json(path, {k: v for k, v in data.items() if not (v is None and k in _UNTIL_SET)})
        return path


# Sections that say where a run reports, not what it trains: changing them is the same run.
NOT_IDENTITY = ("wandb",)


def run_identity(recipe: dict[str, Any], model_fingerprint: str | None) -> str:
    """16 hex chars naming what a run trains: the resolved recipe (less NOT_IDENTITY) and the base."""
    return fingerprint({k: v for k, v in recipe.items() if k not in NOT_IDENTITY}, model_fingerprint)


def recipe_changes(started: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The recipe sections that differ between two resolved recipes, less NOT_IDENTITY."""
    return [key for key in sorted((set(started) | set(now)) - set(NOT_IDENTITY)) if started.get(key) != now.get(key)]


def run_path(path: str | Path) -> Path:
    """`DIR/run.json` for a run directory, the path itself for a file."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def read_run(path: str | Path) -> RunRecord:
    """The record of a run directory or run.json file, or a one-line UsageError naming the file."""
    path = run_path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no run.json (give a run directory written by `workbench train`)")
    data = read_json(path, "run.json")
    if not isinstance(data, dict) or "recipe" not in data:
        raise UsageError(f"{path}: not a workbench run record (no \"recipe\")")
    if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise UsageError(f"{path}: schema_version {data.get('schema_version')!r}, this workbench reads "
                         f"{SCHEMA_VERSION}")
    return parsed(RunRecord, data, path)


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold `run_dir/run.lock` while the block runs: the mark that a live process writes this
    run. A second writer is refused with one line naming the holder."""
    path = Path(run_dir) / LOCK
    created = not path.parent.exists()
    with writing(path, "nothing was written"):  # a read-only or full directory: one line, not a traceback
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise UsageError(f"{run_dir}: another process is writing this run ({handle.read().strip() or 'pid unknown'}); "
                             "wait for it or give another --output-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock; the file stays, empty locks are harmless
        if created and [p.name for p in path.parent.iterdir()] == [LOCK]:  # refused before writing anything
            path.unlink(missing_ok=True)
            path.parent.rmdir()


def is_held(run_dir: str | Path) -> bool:
    """Whether a live process holds the run's lock (works across processes on this machine and
    on file systems with working flock; the lock file gone means nobody holds it)."""
    path = Path(run_dir) / LOCK
    try:
        handle = open(path)
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def run_state(record: RunRecord, path: str | Path) -> str:
    """The record's status, with `running` read as `stale` when no live process writes it."""
    if record.status == "running" and not is_held(run_path(path).parent):
        return "stale"
    return record.status


def describe_state(record: RunRecord, path: str | Path) -> str:
    """One phrase for a run that is not completed: what its record says and what to do."""
    state = run_state(record, path)
    where = record.writer.get("host", "?"), record.writer.get("pid", "?")
    if state == "stale":
        return (f"stale: run.json says running but its writer (pid {where[1]} on {where[0]}) is gone; "
                "continue it with `workbench train ... --resume`")
    if state == "running":
        return f"running (pid {where[1]} on {where[0]})"
    return state + (f" ({record.reason})" if record.reason else "")


def settle(run_dir: str | Path, status: Status, reason: str) -> bool:
    """Mark the running record this process wrote failed or interrupted, with its one-line
    reason; True when written. Never raises: it runs on the way out of an error, which it must
    not hide (a run.json that cannot be written is left to read as stale)."""
    try:
        record = read_run(run_dir)
        if record.status != "running" or record.writer != _writer():
            return False
        record.status, record.reason = status, reason
        record.write(run_dir)
        return True
    except Exception:
        return False


def versions() -> dict[str, str]:
    """The versions a record or a results file states, read from package metadata (no imports)."""
    out = {"python": platform.python_version()}
    for package in ("workbench", "torch", "transformers", "peft", "accelerate"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out
