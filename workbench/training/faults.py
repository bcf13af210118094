"""What a run does when something goes wrong: which checkpoints still load, what run.json says
on every way out, and the one line that says where the last good state is.

A checkpoint is written by the Trainer file by file, `trainer_state.json` last, and then gets a
`manifest.json` of every file's size and sha256 (`write_manifest`). A checkpoint loads when its
state parses and every file matches the manifest; an older checkpoint without a manifest is
checked by format: each torch file is a zip whose CRC-32s must match (torch writes them but never
checks them on load), each safetensors file must be as long as its header says. So a truncated,
zeroed or bit-flipped `optimizer.pt` is found before the Trainer's torch.load trips on it, or,
worse, loads garbage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import struct
import sys
import zipfile
from pathlib import Path
from typing import Iterator

from workbench.distributed import is_main_process
from workbench.errors import Interrupted, UsageError, WriteFailed, first_line
from workbench.formats.run_record import run_lock, settle
from workbench.io import read_json, write_json

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Size and sha256 of every file in `folder` (not sub-folders), written atomically, last."""
    folder = Path(folder)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    path = folder / MANIFEST
    write_json(path, {"files": files})
    return path


def check_folder(folder: str | Path) -> str | None:
    """None when every file in the manifest is there with its size and sha256, else what is
    wrong in a few words; a folder without a manifest is checked file by file by format."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return _check_by_format(folder)
    try:
        files = read_json(manifest, "manifest")["files"]
        for name, expected in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["bytes"]:
                return f"{name} is {path.stat().st_size} bytes, {expected['bytes']} when written"
            if sha256(path) != expected["sha256"]:
                return f"{name} differs from its sha256 when written"
    except (UsageError, OSError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST}: {first_line(exc)}"
    return None


def _check_by_format(folder: Path) -> str | None:
    for path in sorted(folder.iterdir()):
        problem = None
        if path.suffix in (".pt", ".pth", ".bin") and path.name != "training_args.bin":
            problem = check_torch_file(path)
        elif path.suffix == ".safetensors":
            problem = check_safetensors_file(path)
        if problem:
            return f"{path.name}: {problem}"
    return None


def check_torch_file(path: Path) -> str | None:
    """A torch.save file is a zip whose entries carry CRC-32s: None when all match."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"not a complete torch file ({first_line(exc)})"
    return f"entry {bad} fails its CRC-32" if bad else None


def check_safetensors_file(path: Path) -> str | None:
    """The header parses and the file is as long as the header says (no torch needed)."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > path.stat().st_size:
                return "header length past the end of the file"
            header = json.loads(handle.read(size).decode("utf-8"))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, OSError) as exc:
        return f"unreadable safetensors header ({first_line(exc)})"
    actual = path.stat().st_size - 8 - size
    return None if actual == end else f"{actual} data bytes, the header says {end}"


def check_checkpoint(folder: Path) -> str | None:
    """None when the checkpoint loads, else why not."""
    try:
        state = read_json(folder / STATE, STATE)
    except UsageError as exc:
        return str(exc).removeprefix(f"{folder / STATE}: ")
    if not isinstance(state, dict):
        return f"{STATE} is not a JSON object"
    return check_folder(folder)


def _step(path: Path) -> int:
    tail = path.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def checkpoints(output_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first."""
    return sorted((Path(output_dir) / "checkpoints").glob("checkpoint-*"), key=_step, reverse=True)


def latest_checkpoint(output_dir: Path, skipped: list[tuple[Path, str]] | None = None) -> Path | None:
    """The newest checkpoint that loads; each newer one that does not is appended to `skipped`
    with the reason (a checkpoint cut short by a kill, a damaged file)."""
    for folder in checkpoints(output_dir):
        problem = check_checkpoint(folder)
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
    return shlex.join(["workbench", *argv, *([] if "--resume" in argv else ["--resume"])])


def last_good_state(output_dir: Path) -> str:
    """Where a failed run can continue from, in one phrase."""
    checkpoint = latest_checkpoint(output_dir)
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
            if is_main_process():
                ours = type(exc).__module__ == "workbench.errors"  # already a sentence
                settle(output_dir, "failed", first_line(exc) if ours else f"{type(exc).__name__}: {first_line(exc)}")
            raise
