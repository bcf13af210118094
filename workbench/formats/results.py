"""`results.json`: what `workbench eval` writes and what `gate`, `report`, `sweep` and tracking read.

The layout and every metric name are documented in docs/results.md; the names themselves live in
the catalogue, `workbench.formats.metrics`, which that page's table is generated from.

Schema 2 adds `entries[].items`: per-item scores (per general-text chunk, per multiple-choice
item, per held-out target example) from which `workbench compare` recomputes each metric on a
resample of the items, jointly for every entry scored on the same items. Schema 1 files (no
items) are still read; compare then falls back to independent CIs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from workbench.errors import UsageError
from workbench.io import read_json

SCHEMA_VERSION = 2
READS = (1, 2)  # 1: before per-item scores
KIND = "workbench.eval"
DIGITS = 7  # significant digits of a stored per-item float: a relative error under 5e-8, so a
# chunk's summed NLL of ~800 nats keeps ~1e-4 and a pooled perplexity ratio moves by < 1e-7


def metric(value: float, ci: tuple[float, float] | None = None) -> dict:
    """One metric record; NaN and inf are kept out of JSON as None."""
    def clean(x: float) -> float | None:
        x = float(x)
        return x if math.isfinite(x) else None

    record: dict[str, Any] = {"value": clean(value)}
    if ci is not None:
        record["ci"] = [clean(ci[0]), clean(ci[1])]
    return record


def item_values(values) -> list:
    """Per-item scores as compact JSON: integers (token counts, 0/1 correctness) as ints, other
    floats to DIGITS significant digits, NaN and inf as None (compare then ignores the component)."""
    out = []
    for x in values:
        x = float(x)
        out.append(None if not math.isfinite(x) else int(x) if x.is_integer() and abs(x) < 2 ** 53
                   else float(f"{x:.{DIGITS}g}"))
    return out


def items_record(key: str, **columns) -> dict:
    """One component's per-item scores: `key` fingerprints the items (same key, same items in the
    same order, so indices pair across entries) and every column has one value per item."""
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"per-item columns differ in length: { {k: len(v) for k, v in columns.items()} }")
    return {"key": key, **{name: item_values(v) for name, v in columns.items()}}


# A list of numbers (or nulls) as `json.dumps(indent=2)` lays it out, one element per line. JSON
# strings hold no raw newline, so a match that spans lines is always a structural list.
_NUMBER_LIST = re.compile(r"\[\n\s+((?:-?[\d.eE+]+|null)(?:,\n\s+(?:-?[\d.eE+]+|null))*)\n\s*\]")


def dumps(results: dict) -> str:
    """results.json text: indented, with every list of numbers on one line (a CI, a ROC curve,
    a column of per-item scores), so 400 multiple-choice items take one line, not 400."""
    text = json.dumps(results, indent=2, default=str)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\s+", m.group(1))) + "]", text) + "\n"


def load_results(path: str | Path) -> dict:
    """Read and check a results file; any problem is a one-line UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: results file not found")
    results = read_json(path, "results JSON file")
    if not isinstance(results, dict) or results.get("kind") != KIND:
        raise UsageError(f"{path}: not a workbench results file (no \"kind\": \"{KIND}\")")
    if results.get("schema_version") not in READS:
        raise UsageError(f"{path}: schema_version {results.get('schema_version')!r}, "
                         f"this workbench reads {' and '.join(map(str, READS))}")
    entries = results.get("entries")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: no entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not isinstance(entry.get("metrics"), dict):
            raise UsageError(f"{path}: entries[{i}] needs a name and a metrics mapping")
    return results
