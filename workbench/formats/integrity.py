"""Whether a binary file or a folder of them is whole, without loading it (and without torch).

A folder the workbench writes (a checkpoint, an adapter) gets a `manifest.json` of every file's
size and sha256, written last. A folder with a manifest is whole when every file matches it; one
without (written elsewhere, or before manifests) is checked by format: a torch file is a zip
whose CRC-32s must match (torch writes them but never checks them on load), a safetensors file
must be as long as its header says. Without a manifest a flipped byte inside safetensors data
goes unseen: nothing in the format could see it.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

from workbench.errors import UsageError, first_line
from workbench.io import read_json, write_json

MANIFEST = "manifest.json"
_CHUNK = 1 << 20
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path, run: str | None = None) -> Path:
    """Size and sha256 of every file in `folder` (not sub-folders), written atomically; `run`, the
    fingerprint of the run that wrote a checkpoint, marks whose it is (`manifest_run`)."""
    folder = Path(folder)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    path = folder / MANIFEST
    write_json(path, {"files": files, **({"run": run} if run else {})})
    return path


def manifest_run(folder: str | Path) -> str | None:
    """The run fingerprint a folder's manifest records; None when it records none, or has no
    manifest it can read (`check_folder` says what is wrong with one)."""
    path = Path(folder) / MANIFEST
    try:
        data = read_json(path, "manifest") if path.is_file() else None
    except UsageError:
        return None
    return data.get("run") if isinstance(data, dict) else None


def check_folder(folder: str | Path) -> tuple[str, str] | None:
    """None when the folder is whole, else (the file's name, what is wrong with it)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return _check_by_format(folder)
    try:
        files = read_json(folder / MANIFEST, "manifest")["files"]
        for name, expected in files.items():
            path = folder / name
            if not path.is_file():
                return name, "missing"
            if path.stat().st_size != expected["bytes"]:
                return name, f"{path.stat().st_size} bytes, {expected['bytes']} when written (damaged)"
            if sha256(path) != expected["sha256"]:
                return name, "its sha256 differs from when it was written (damaged)"
    except UsageError as exc:
        return MANIFEST, str(exc).split(": ", 1)[-1]
    except (OSError, KeyError, TypeError, AttributeError) as exc:
        return MANIFEST, f"unreadable ({first_line(exc)})"
    return None


def _check_by_format(folder: Path) -> tuple[str, str] | None:
    for path in sorted(folder.iterdir()):
        problem = None
        if path.suffix in TORCH_SUFFIXES and path.name != "training_args.bin":  # nothing loads that
            problem = check_torch_file(path)
        elif path.suffix == ".safetensors":
            problem = check_safetensors_file(path)
        elif path.suffix == ".json":  # configs and tokenizer.json: a cut file no longer parses
            problem = check_json_file(path)
        if problem:
            return path.name, problem
    return None


def check_torch_file(path: Path) -> str | None:
    """A torch.save file is a zip whose entries carry CRC-32s: None when all match."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"not a complete torch file ({first_line(exc)})"
    return f"entry {bad} fails its CRC-32 (damaged)" if bad else None


def check_json_file(path: Path) -> str | None:
    """None when the file is UTF-8 JSON, else what is wrong (a cut, zeroed or flipped file)."""
    try:
        read_json(path)
    except UsageError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


def check_safetensors_file(path: Path) -> str | None:
    """The header parses and the file is as long as the header says."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > path.stat().st_size:
                return "not a complete safetensors file (its header runs past the end)"
            header = json.loads(handle.read(size).decode("utf-8"))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        return f"not a readable safetensors file ({first_line(exc)})"
    actual = path.stat().st_size - 8 - size
    return None if actual == end else f"not a complete safetensors file ({actual} data bytes, the header says {end})"


SEAL = "workbench_sha256"  # a safetensors metadata key: the sha256 of the data after the header
_PLACEHOLDER = "0" * 64


def seal_metadata(metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Metadata to write a safetensors file with, holding a placeholder that `seal` fills in."""
    return {**(metadata or {}), SEAL: _PLACEHOLDER}


def seal(path: str | Path) -> None:
    """Fill in the sha256 of a just-written safetensors file's data, in place: the placeholder
    has the digest's length, so the header keeps its size and the data its offsets."""
    path = Path(path)
    with open(path, "r+b") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = handle.read(size)
        digest = hashlib.sha256()
        while block := handle.read(_CHUNK):
            digest.update(block)
        placeholder = f'"{SEAL}":"{_PLACEHOLDER}"'.encode()
        if header.count(placeholder) != 1:
            raise ValueError(f"{path}: no {SEAL} placeholder in the safetensors header")
        handle.seek(8)
        handle.write(header.replace(placeholder, f'"{SEAL}":"{digest.hexdigest()}"'.encode()))


def check_sealed(path: Path) -> str | None:
    """None when a safetensors file is whole: its header, its length and, when it carries one,
    its data's sha256."""
    problem = check_safetensors_file(path)
    if problem:
        return problem
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        expected = (json.loads(handle.read(size)).get("__metadata__") or {}).get(SEAL)
        if expected is None:
            return None
        digest = hashlib.sha256()
        while block := handle.read(_CHUNK):
            digest.update(block)
    return None if digest.hexdigest() == expected else "its data's sha256 differs from when it was written (damaged)"
