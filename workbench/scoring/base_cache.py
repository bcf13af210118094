"""The base model's side of every eval, cached on disk so the next adapter costs only its own scoring.

One entry per eval component (general text, one multiple-choice task, one target dataset), keyed
by the fingerprints of the base weights, the component's settings and its data. An entry is a
safetensors file of tensors. Writers hold a file lock, so concurrent evals sharing a base compute
an entry once, and write to a temporary file then rename, so a killed eval leaves no torn entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workbench.distributed import all_ranks, is_main_process, world_size
from workbench.errors import WriteFailed, first_line
from workbench.formats.integrity import check_sealed, seal, seal_metadata
from workbench.io import atomic_path, cache_dir, fingerprint


class BaseCache:
    def __init__(self, model_fingerprint: str, root: Path | None = None, enabled: bool = True):
        self.model_fingerprint = model_fingerprint
        self.root = root or cache_dir() / "evals" / "base"
        self.enabled = enabled
        self.hits: list[str] = []
        self.misses: list[str] = []

    def path(self, component: str, *key_parts) -> Path:
        key = fingerprint(self.model_fingerprint, component, *key_parts)
        return self.root / f"{component.replace(':', '-')}-{key}.safetensors"

    def get(self, component: str, key_parts: tuple, compute: Callable[[], dict[str, torch.Tensor]]
            ) -> dict[str, torch.Tensor]:
        """The cached tensors for this component, computing and storing them on a miss."""
        if not self.enabled:
            self.misses.append(component)
            return compute()
        path = self.path(component, *key_parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        if world_size() > 1:
            return self._get_collectively(path, component, compute)
        with FileLock(str(path) + ".lock"):
            tensors = _load(path)  # an unreadable entry is recomputed and replaced
            if tensors is not None:
                self.hits.append(component)
                return tensors
            tensors = compute()
            _store(path, tensors)
            self.misses.append(component)
            return tensors

    def _get_collectively(self, path: Path, component: str, compute: Callable[[], dict[str, torch.Tensor]]
                          ) -> dict[str, torch.Tensor]:
        """Under a multi-process launch the base side is scored by all ranks together, so whether
        to compute is decided together: a hit only when every rank can read the entry (no rank may
        wait on the lock while the others need it to score); the main process writes."""
        tensors = _load(path)
        if all_ranks(tensors is not None):
            self.hits.append(component)
            return tensors
        tensors = compute()
        if is_main_process():
            with FileLock(str(path) + ".lock"):
                _store(path, tensors)
        self.misses.append(component)
        return tensors


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    """The entry's tensors, or None when it is missing or damaged (said in one line: the entry
    is computed again and replaced)."""
    if not path.is_file():
        return None
    try:
        damaged = check_sealed(path)
        if damaged is None:
            return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        damaged = first_line(exc)
    if is_main_process():
        print(f"cache: {path}: {damaged}; computing it again", flush=True)
    return None


def _store(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write the entry; a failed write (no space, no permission) is said in one line and the job
    goes on without it: a cache entry is only ever a shortcut."""
    try:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=seal_metadata())
            seal(tmp)
    except WriteFailed as exc:
        print(f"cache: could not write {path} ({exc.cause}); going on without caching it", flush=True)


def ragged(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Variable-length 1-D rows as (values, offsets) for storage."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    values = torch.cat(rows) if rows else torch.zeros(0)
    return {"values": values, "offsets": offsets}


def unragged(values: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
