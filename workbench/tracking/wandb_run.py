"""One W&B run behind calls that never raise.

Tracking never breaks a job: a missing `wandb` import, a failing `wandb.init`, a full disk or an
unreachable server each print one warning line, and the job goes on without W&B. No secret is
ever put into a config, a record or a log line: the API key is only looked up, never read out.
"""

from __future__ import annotations

import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

from workbench.config.recipe import WandbSection
from workbench.tracking.names import has_api_key, resolve_mode


def warn(what: str, exc: BaseException) -> None:
    """The one line a W&B failure costs: what failed and why, at most 200 characters of it."""
    from tqdm import tqdm

    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    # through tqdm, so that a progress bar on the terminal moves aside instead of sharing the line
    tqdm.write(f"warning: W&B {what} failed ({type(exc).__name__}: {reason}); continuing without tracking",
               file=sys.stderr)


def _artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, dash, underscore and dot."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "artifact"


def _wait_for_a_fresh_offline_folder(directory: Path, run_id: str) -> None:
    """An offline rejoin goes to `offline-run-<start second>-<id>`; a rejoin within the same second
    as the run's last start (an eval right after a short training) would reuse that folder and
    overwrite its log, so wait for the clock to move on (at most about a second)."""
    def taken() -> bool:
        stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
        return (directory / "wandb" / f"offline-run-{stamp}-{run_id}").exists()

    deadline = time.monotonic() + 1.5
    while taken() and time.monotonic() < deadline:
        time.sleep(0.05)


class Tracker:
    """One W&B run behind calls that never raise: the first failure warns in one line and turns
    the tracker off for the rest of the job. An inactive tracker (`Tracker()`) does nothing."""

    def __init__(self, run=None, mode: str = "disabled", wandb=None):
        self.run = run
        self.mode = mode
        self.wandb = wandb  # the module, kept so that no later call has to import it again

    @property
    def active(self) -> bool:
        return self.run is not None

    @classmethod
    def start(cls, section: WandbSection, *, name: str, group: str | None, config: dict, job_type: str,
              directory: Path, run_id: str | None = None, tags: list[str] | None = None) -> "Tracker":
        """Start (or, with run_id, rejoin) a W&B run; an inactive tracker when off or failing.
        `tags` default to the section's own."""
        mode = resolve_mode(section)
        if mode == "disabled":
            return cls()
        try:
            import wandb
        except Exception as exc:  # ImportError, or an install broken in some other way
            warn("import", exc)
            return cls()
        directory = Path(os.environ.get("WANDB_DIR") or directory)  # WANDB_DIR wins, as in wandb itself
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if run_id and mode == "offline":
                _wait_for_a_fresh_offline_folder(directory, run_id)
            run = wandb.init(
                project=section.project, entity=section.entity, group=group, name=name,
                tags=list(section.tags if tags is None else tags), job_type=job_type, config=config, dir=str(directory),
                mode=mode, id=run_id, resume="allow" if run_id else None, reinit="create_new",
                # our stdout stays ours (no console capture), and wandb's banner is replaced by one line
                settings=wandb.Settings(console="off", silent=True))
        except Exception as exc:
            warn("start", exc)
            return cls()
        why = " (no API key)" if mode == "offline" and not has_api_key() else ""
        print(f"wandb: {mode} run {name} ({run.id}) in group {group}{why}")
        return cls(run, mode, wandb)

    def _safely(self, what: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None: when the tracker is off, or when fn fails (then warn once)."""
        if self.run is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # a full disk, a dead service, a bad value: never the job's problem
            warn(what, exc)
            self.run = None
            return None

    def info(self) -> dict:
        """What run.json records to find this run again: never a key or a token."""
        if self.run is None:
            return {}
        run = self.run
        return {"id": run.id, "name": run.name, "project": run.project, "entity": run.entity or None,
                "group": run.group, "job_type": run.job_type, "mode": self.mode, "dir": self.sync_dir()}

    def sync_dir(self) -> str | None:
        """The run's local directory: what `wandb sync` uploads."""
        return self._safely("settings", lambda: str(self.run.settings.sync_dir))

    def log(self, metrics: dict) -> None:
        self._safely("log", lambda: self.run.log(metrics))

    def summary(self, metrics: dict) -> None:
        self._safely("summary", lambda: self.run.summary.update(metrics))

    def define_step(self, step_metric: str) -> None:
        """Plot every metric against `step_metric` (a key logged with it), not W&B's own counter:
        a resumed run logs from its checkpoint's step again without W&B dropping the records."""
        def define():
            self.run.define_metric(step_metric)
            self.run.define_metric("*", step_metric=step_metric, step_sync=True)
        self._safely("define_metric", define)

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        self._safely("table", lambda: self.run.log({key: self.wandb.Table(columns=columns, data=rows,
                                                                          allow_mixed_types=True)}))

    def images(self, paths: dict[str, Path]) -> None:
        self._safely("images", lambda: self.run.log({k: self.wandb.Image(str(p)) for k, p in paths.items()}))

    def artifact(self, name: str, kind: str, path: Path, metadata: dict) -> None:
        """Log a file or a directory as an artifact; metadata carries its lineage (fingerprints)."""
        def log():
            artifact = self.wandb.Artifact(_artifact_name(name), type=kind, metadata=metadata)
            root = Path(path)
            # file by file rather than add_dir, which prints a progress line of its own
            for file in sorted(root.rglob("*")) if root.is_dir() else [root]:
                if file.is_file():
                    artifact.add_file(str(file), name=str(file.relative_to(root)) if root.is_dir() else file.name)
            self.run.log_artifact(artifact)
        self._safely(f"artifact {name}", log)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; offline, print the command that uploads it."""
        if self.run is None:
            return
        sync_dir = self.sync_dir() if self.mode == "offline" else None
        self._safely("finish", self.run.finish, exit_code=exit_code)
        self.run = None
        if sync_dir:
            print(f"wandb: offline run saved; upload it with: wandb sync {sync_dir}")

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        """Close the run as failed when the block raises, then let the exception go on."""
        if exc is not None:
            self.finish(exit_code=1)
