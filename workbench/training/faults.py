"""What a run does when something goes wrong: which checkpoints still load, what run.json says
on every way out, and the one line that says where the last good state is.

A checkpoint is written by the Trainer file by file, `trainer_state.json` last, and then gets a
`manifest.json` of every file's size and sha256 (`formats.integrity`). A checkpoint loads when
its state parses and every file is whole (`check_checkpoint`): a truncated, zeroed or bit-flipped
`optimizer.pt` is found before the Trainer's torch.load trips on it or, worse, loads garbage.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Iterator

from workbench.distributed import is_main_process, world_size
from workbench.errors import Interrupted, RunFailed, UsageError, WriteFailed, first_line
from workbench.formats.integrity import MANIFEST, check_folder, manifest_run
from workbench.formats.run_record import read_run, run_lock, settle
from workbench.io import read_json

STATE = "trainer_state.json"


def check_checkpoint(folder: Path, identity: str | None = None) -> str | None:
    """None when the checkpoint loads, else why not. With `identity` (the run fingerprint,
    `RunRecord.identity`), a checkpoint whose manifest names another run, or none, does not load:
    its optimizer and adapter would continue someone else's training, or fail on their shapes."""
    try:
        state = read_json(folder / STATE, STATE)
    except UsageError as exc:
        return str(exc).removeprefix(f"{folder / STATE}: ")
    if not isinstance(state, dict):
        return f"{STATE} is not a JSON object"
    problem = check_folder(folder)
    if problem:
        return f"{problem[0]}: {problem[1]}"
    if identity is not None and (owner := manifest_run(folder)) != identity:
        return (f"another run's checkpoint (run fingerprint {owner}; this run's is {identity})" if owner else
                f"{MANIFEST} names no run (written by another tool or an older workbench)")
    return None


def checkpoint_step(path: Path) -> int:
    """The step in a folder name checkpoint-N; -1 when it has none."""
    tail = path.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def checkpoints(output_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first."""
    return sorted((Path(output_dir) / "checkpoints").glob("checkpoint-*"), key=checkpoint_step, reverse=True)


def latest_checkpoint(output_dir: Path, skipped: list[tuple[Path, str]] | None = None,
                      identity: str | None = None) -> Path | None:
    """The newest checkpoint that loads (and, given `identity`, is this run's); each newer one that
    does not is appended to `skipped` with the reason (cut short by a kill, a damaged file, another run's)."""
    for folder in checkpoints(output_dir):
        problem = check_checkpoint(folder, identity)
        if problem is None:
            return folder
        if skipped is not None:
            skipped.append((folder, problem))
    return None


def resume_command(output_dir: Path) -> str:
    """The command that continues this run: the one that started it, with --resume."""
    argv = sys.argv[sys.argv.index("train"):] if "train" in sys.argv else ["train", "RECIPE"]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(output_dir)]
    launch = (["accelerate", "launch", "--num_processes", str(world_size()), "-m"] if world_size() > 1 else [])
    return shlex.join([*launch, "workbench", *argv, *([] if "--resume" in argv else ["--resume"])])


def last_good_state(output_dir: Path) -> str:
    """Where a failed run can continue from, in one phrase: its own newest complete checkpoint."""
    try:
        identity = read_run(output_dir).identity
    except UsageError:  # no run.json yet (its first write failed): the checkpoints say whose they are
        identity = None
    checkpoint = latest_checkpoint(output_dir, identity=identity)
    if checkpoint is None:
        return f"no complete checkpoint in {output_dir / 'checkpoints'}: start the run again"
    return f"newest complete checkpoint: {checkpoint}; continue with: {resume_command(output_dir)}"


@contextlib.contextmanager
def recorded(output_dir: Path) -> Iterator[None]:
    """Run a training job so that run.json tells the truth on every way out Python sees: the
    lock held while it runs (main process), `failed` with the error's line, `interrupted` on
    Ctrl-C; a failed write re-raised with where the last good state is."""
    with run_lock(output_dir) if is_main_process() else contextlib.nullcontext():
        try:
            yield
        except WriteFailed as exc:
            state = last_good_state(output_dir)
            if is_main_process():
                settle(output_dir, "failed", f"could not write {exc.path} ({exc.cause})")
            raise WriteFailed(exc.path, exc.cause, state) from exc
        except (KeyboardInterrupt, Interrupted) as exc:
            if is_main_process():
                settle(output_dir, "interrupted", first_line(exc) if str(exc) else "KeyboardInterrupt")
            raise
        except BaseException as exc:
            ours = type(exc).__module__ == "workbench.errors"  # already a sentence
            reason = lost_peer(exc) or (first_line(exc) if ours else f"{type(exc).__name__}: {first_line(exc)}")
            if is_main_process():
                settle(output_dir, "failed", reason[:300])
            if lost_peer(exc):
                raise RunFailed(f"{reason}; {last_good_state(output_dir)}") from exc
            raise


# what gloo and NCCL say when another rank's process is gone (killed, out of memory, node lost)
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "remote process exited or there was a network error")


def lost_peer(exc: BaseException) -> str | None:
    """'a data-parallel process is gone (...)' when a collective failed because a rank died."""
    text = str(exc)
    found = next((m for m in _PEER_GONE if m in text), None)
    return f"a data-parallel process is gone ({type(exc).__name__}: {found})" if found else None
