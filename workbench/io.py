"""Atomic file writes, the cache directory, and content fingerprints.

Everything the workbench writes goes through a temporary file in the same directory followed
by `os.replace`, so a process killed at any moment leaves either the old file or the new one, and
a write that fails (no space, no permission, the directory gone) raises `WriteFailed` naming the
file and its cause, with the old file unchanged. Text and JSON are read through `read_text` and
`read_json`, which turn a missing, unreadable or damaged file into one line naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from workbench.errors import UsageError, WriteFailed, first_line

UNCHANGED = "the previous file, if any, is unchanged"


def cache_dir() -> Path:
    """Root of the workbench cache: `$WORKBENCH_CACHE`, else `$XDG_CACHE_HOME/workbench`, else
    `~/.cache/workbench` (the XDG base directory default)."""
    root = (os.environ.get("WORKBENCH_CACHE")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "workbench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_cause(exc: BaseException, where: str | os.PathLike | None = None) -> str | None:
    """What made a write fail, in a few words, or None when `exc` is not a failed write.

    Python and safetensors raise OSError (safetensors' Rust error says "os error 28"); torch's
    C++ writer raises RuntimeError without the errno: "PytorchStreamWriter failed writing file
    ...", or, on a disk that fills while it writes, "[enforce fail at inline_container.cc:672] .
    unexpected pos 576 vs 534" (its zip writer finds fewer bytes written than it sent). For it an
    empty disk under `where` is checked to say "no space left on device".
    """
    if isinstance(exc, OSError):
        return (exc.strerror or first_line(exc)).lower()
    text = str(exc)
    if "os error" in text:  # safetensors: "... No space left on device (os error 28)"
        return first_line(exc).rsplit(": ", 1)[-1].split(" (os error")[0].lower()
    if isinstance(exc, RuntimeError) and any(m in text for m in _TORCH_WRITER):
        return _no_space(where) or "the torch writer failed"
    return None


_TORCH_WRITER = ("PytorchStreamWriter", "file write failed", "inline_container.cc")


def _no_space(where) -> str | None:
    path = Path(where) if where is not None else None
    while path is not None and not path.exists() and path != path.parent:
        path = path.parent
    if path is not None and shutil.disk_usage(path).free < 1 << 20:
        return os.strerror(errno.ENOSPC).lower()
    return None


@contextlib.contextmanager
def writing(target: str | os.PathLike, state: str = UNCHANGED) -> Iterator[None]:
    """Turn a failed write inside the block into `WriteFailed(target, cause, state)`."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as exc:
        cause = write_cause(exc, target)
        if cause is None:
            raise
        raise WriteFailed(target, cause, state) from exc


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, state: str = UNCHANGED) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` only on success. A failed
    write raises WriteFailed naming `target` and `state` (where the last good state is)."""
    target = Path(target)
    tmp = None
    try:
        with writing(target, state):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are as readable as any file
            yield Path(tmp)
            os.replace(tmp, target)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(target: str | os.PathLike, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """A file's bytes, or a one-line UsageError naming it: missing, a directory, unreadable."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: {what} not found")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the {what} ({(exc.strerror or first_line(exc)).lower()})") from None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file (strictly decoded, so a flipped byte is caught), or one line naming it."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not a readable {what} (not UTF-8 text at byte {exc.start})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """A JSON file, or one line naming it and what is wrong (missing, not UTF-8, cut short)."""
    text = read_text(path, what)
    if not text.strip():
        raise UsageError(f"{path}: not a readable {what} (empty)")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{path}: not a readable {what} (invalid JSON: {first_line(exc)})") from None


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (configs, file digests, names)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

