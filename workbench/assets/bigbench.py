"""BIG-bench tasks without the model hub: the PyPI sdist `bigbench==1.0.0` carries every task's
`task.json`. `fetch_bigbench` downloads it once with pip, streams through it and keeps only the
named tasks in the cache (`<cache>/bigbench/<task>/task.json`); the 358 MB archive itself is not
kept. A subtask is named `task/subtask` (e.g. `arithmetic/1_digit_addition`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from workbench.assets.fetch import file_lock, pip_download
from workbench.config.suggest import did_you_mean
from workbench.errors import UsageError
from workbench.io import atomic_path, cache_dir, read_json

BIGBENCH_SDIST = "bigbench==1.0.0"
_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_ENV = "WORKBENCH_BIGBENCH_SDIST"  # a local copy of the sdist (or a test archive): no download
_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")
_INDEX = "index.json"  # every task name in the archive, for did-you-mean without re-reading it


def _bigbench_root() -> Path:
    return cache_dir() / "bigbench"


def fetch_bigbench(names: list[str], sdist: str | os.PathLike | None = None) -> dict[str, Path]:
    """{name: path of its task.json in the cache}, extracting the tasks not cached yet.

    The archive is `sdist`, else `$WORKBENCH_BIGBENCH_SDIST`, else downloaded from PyPI (and
    checked against a pinned sha256). It is read once, whatever the number of missing tasks.
    Raises UsageError for a name that is not a task in the archive, with a did-you-mean.
    """
    root = _bigbench_root()
    for name in names:
        if not _NAME.fullmatch(name) or {".", ".."} & set(name.split("/")):
            raise UsageError(f"bigbench task {name!r}: not a task name (expected 'task' or 'task/subtask')")
    missing = [n for n in dict.fromkeys(names) if not (root / n / "task.json").is_file()]
    if missing:
        _check_index(root, missing)
        root.mkdir(parents=True, exist_ok=True)
        with file_lock(root / ".lock"):
            missing = [n for n in missing if not (root / n / "task.json").is_file()]  # another process?
            if missing:
                _extract(root, missing, sdist or os.environ.get(SDIST_ENV))
    return {name: root / name / "task.json" for name in names}


def _check_index(root: Path, names: list[str]) -> None:
    """Refuse unknown names before downloading anything, once an earlier fetch listed the archive."""
    known = _cached_json(root / _INDEX)
    if known is None:
        return
    known = set(known)
    for name in names:
        if name not in known:
            raise UsageError(f"bigbench task {name!r} is not in {BIGBENCH_SDIST}{did_you_mean(name, known, n=3)}")


def _cached_json(path: Path):
    """A cached JSON file's content; None when it is missing, and when it is damaged: then it is
    removed, saying so in one line, and rebuilt from the archive when that is next read."""
    if not path.is_file():
        return None
    try:
        return read_json(path, "cached BIG-bench file")
    except UsageError as exc:
        print(f"bigbench: {exc}; removed, to be extracted again from the archive")
        path.unlink(missing_ok=True)
        return None


def _extract(root: Path, names: list[str], sdist: str | os.PathLike | None) -> None:
    """Copy the named tasks' task.json out of the archive (call under the lock)."""
    for stale in root.glob(".sdist-*"):  # a download dir left by a killed process
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.rglob(".*.tmp"):  # a write a killed process never renamed into place
        stale.unlink(missing_ok=True)
    if sdist is not None:
        found, known = _scan_sdist(Path(sdist), set(names))
    else:
        print(f"fetching {BIGBENCH_SDIST} from PyPI (358 MB) for {', '.join(names)} ...",
              file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=".sdist-", dir=root) as tmp:
            found, known = _scan_sdist(_download_sdist(Path(tmp)), set(names))
    with atomic_path(root / _INDEX) as tmp_index:
        tmp_index.write_text(json.dumps(sorted(known)))
    for name in names:
        if name not in found:
            raise UsageError(f"bigbench task {name!r} is not in {BIGBENCH_SDIST}{did_you_mean(name, known, n=3)}")
    # Check every file before writing any, so a bad archive leaves the cache as it was.
    for name, data in found.items():
        try:
            json.loads(data)
        except ValueError as exc:
            raise UsageError(f"bigbench task {name!r}: its task.json in the archive is not JSON "
                             f"({exc})") from None
    for name, data in found.items():
        with atomic_path(root / name / "task.json") as tmp:
            tmp.write_bytes(data)


def _task_name(member: str) -> str | None:
    """`task` or `task/subtask` for `<top>/bigbench/benchmark_tasks/<...>/task.json`, else None."""
    parts = member.split("/")
    for i in range(len(parts) - 1):
        if parts[i:i + 2] == ["bigbench", "benchmark_tasks"]:
            rest = parts[i + 2:]
            if rest[-1:] == ["task.json"] and 2 <= len(rest) <= 3:
                return "/".join(rest[:-1])
    return None


def _scan_sdist(sdist: Path, wanted: set[str]) -> tuple[dict[str, bytes], set[str]]:
    """One streaming pass over the archive: the wanted tasks' bytes, and every task name in it."""
    found: dict[str, bytes] = {}
    known: set[str] = set()
    try:
        with tarfile.open(sdist, "r|*") as archive:  # stream: no random access into 358 MB
            for member in archive:
                name = _task_name(member.name)
                if name is None or not member.isfile():
                    continue
                known.add(name)
                if name in wanted:
                    found[name] = archive.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise UsageError(f"bigbench: cannot read the archive {sdist} ({exc})") from None
    if not known:
        raise UsageError(f"bigbench: {sdist} holds no bigbench/benchmark_tasks/*/task.json")
    return found, known


def _download_sdist(workdir: Path) -> Path:
    """Download the pinned sdist with pip into `workdir` and check its digest; its path."""
    return pip_download(BIGBENCH_SDIST, workdir, _SDIST_SHA256, "bigbench-*.tar.gz", "bigbench", sdist=True,
                        hint=f"; or point ${SDIST_ENV} at a local copy")


def task_examples(name: str) -> list[dict]:
    """The task's examples, fetched if needed; a parent task split into subtasks says which exist."""
    path = fetch_bigbench([name])[name]
    task = _cached_json(path)
    if not isinstance(task, dict):  # damaged in the cache: extracted again from the archive
        path.unlink(missing_ok=True)
        task = read_json(fetch_bigbench([name])[name], "BIG-bench task file")
    examples = task.get("examples") if isinstance(task, dict) else None
    if isinstance(examples, list) and examples:
        return examples
    known = _cached_json(_bigbench_root() / _INDEX) or []
    subtasks = sorted(n for n in known if n.startswith(name + "/"))
    shown = ", ".join(subtasks[:5]) + (", ..." if len(subtasks) > 5 else "")
    hint = f"; name a subtask: {shown}" if subtasks else ""
    raise UsageError(f"bigbench task {name!r} has no examples of its own{hint}")
