"""`results.json`: what `workbench eval` writes and what `gate`, `report`, `sweep` and tracking read.

The layout and every metric name are documented in docs/results.md; the names themselves live in
the catalogue, `workbench.formats.metrics`, which that page's table is generated from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from workbench.errors import UsageError
from workbench.io import read_json

SCHEMA_VERSION = 1
KIND = "workbench.eval"


def metric(value: float, ci: tuple[float, float] | None = None) -> dict:
    """One metric record; NaN and inf are kept out of JSON as None."""
    def clean(x: float) -> float | None:
        x = float(x)
        return x if math.isfinite(x) else None

    record: dict[str, Any] = {"value": clean(value)}
    if ci is not None:
        record["ci"] = [clean(ci[0]), clean(ci[1])]
    return record


def load_results(path: str | Path) -> dict:
    """Read and check a results file; any problem is a one-line UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: results file not found")
    results = read_json(path, "results JSON file")
    if not isinstance(results, dict) or results.get("kind") != KIND:
        raise UsageError(f"{path}: not a workbench results file (no \"kind\": \"{KIND}\")")
    if results.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{path}: schema_version {results.get('schema_version')!r}, "
                         f"this workbench reads {SCHEMA_VERSION}")
    entries = results.get("entries")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: no entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not isinstance(entry.get("metrics"), dict):
            raise UsageError(f"{path}: entries[{i}] needs a name and a metrics mapping")
    return results
