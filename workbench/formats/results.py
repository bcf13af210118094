"""`results.json`: what `workbench eval` writes and what `gate`, `report`, `sweep`, `compare`,
`calibrate` and tracking read, built and read only through the typed `Results` and `Entry` here.

The layout and every metric name are documented in docs/results.md; the names themselves live in
the catalogue, `workbench.formats.metrics`, which that page's table is generated from. A reader
asks an entry for a metric with `Entry.value` (or a CI bound) and `Entry.interval`: None when the
entry lacks it or it is null or non-finite, the one place that decides what counts as a number.

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
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictFloat, StrictInt, ValidationError,
                      model_serializer, model_validator)

from workbench.errors import UsageError
from workbench.io import atomic_path, read_json

SCHEMA_VERSION = 2
READS = (1, 2)  # 1: before per-item scores
KIND = "workbench.eval"
DIGITS = 7  # significant digits of a stored per-item float: a relative error under 5e-8, so a
# chunk's summed NLL of ~800 nats keeps ~1e-4 and a pooled perplexity ratio moves by < 1e-7
Number = StrictFloat | StrictInt  # a bool or a string is no metric value
At = Literal["value", "ci_low", "ci_high"]


def is_finite(x) -> bool:
    """Whether x is a finite number (a bool, a string or a null is not)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def finite(x) -> float | None:
    """x as a float when it is a finite number, else None."""
    return float(x) if is_finite(x) else None


def metric(value: float, ci: tuple[float, float] | None = None) -> dict:
    """One metric record; NaN and inf are kept out of JSON as None."""
    def clean(x: float) -> float | None:
        x = float(x)
        return x if math.isfinite(x) else None

    record: dict[str, Any] = {"value": clean(value)}
    if ci is not None:
        record["ci"] = [clean(ci[0]), clean(ci[1])]
    return record


class Metric(BaseModel):
    """One metric of an entry: its value and, where there is one, its 95% CI (null for non-finite)."""

    model_config = ConfigDict(extra="allow")

    value: Number | None
    ci: tuple[Number | None, Number | None] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_ci(self, handler) -> dict:
        data = handler(self)
        if self.ci is None:
            data.pop("ci", None)
        return data


class Entry(BaseModel):
    """One adapter at one scale, or one checkpoint, as `workbench eval` scored it against the base.
    Keys a later version adds are kept as they are (extra="allow")."""

    model_config = ConfigDict(extra="allow")

    name: str
    adapter: str | None = None
    run: str | None = Field(default=None, description="The run directory, or null for a bare adapter.")
    family: str = Field(default="", description="The recipe: one recipe's scales, checkpoints, strengths and "
                        "seeds; in files that predate it, the name before '@' or ':' (`kl@0.5`, `kl:step20`).")
    seed: StrictInt | None = Field(default=None, description="The run's train.seed; null for a bare adapter.")
    step: StrictInt | None = Field(default=None, description="The optimiser step the adapter was saved at.")
    scale: Number = Field(default=1.0, description="0 is the base, 1 the tuned adapter.")
    light: bool = Field(default=False, description="Scored on learning and general text only.")
    changes_model: bool | None = Field(default=None, description="False when the delta is exactly zero.")
    delta_norm: Number | None = None
    metrics: dict[str, Metric]
    curves: dict[str, Any] = Field(default_factory=dict)
    items: dict[str, Any] | None = Field(default=None, description="Per-item scores (schema 2).")
    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _family_from_name(self) -> "Entry":
        self.family = self.family or re.split(r"[@:]", self.name, maxsplit=1)[0]
        return self

    @property
    def source(self) -> Path | None:
        """The results file the entry was read from, when it was read from one."""
        return self._source

    def read_from(self, source: Path | None) -> "Entry":
        self._source = source
        return self

    def value(self, name: str, at: At = "value") -> float | None:
        """The metric's value, or its CI's low or high bound; None when the entry lacks the metric
        (or the CI) or the number is null or non-finite."""
        record = self.metrics.get(name)
        if record is None:
            return None
        if at == "value":
            return finite(record.value)
        return None if record.ci is None else finite(record.ci[0 if at == "ci_low" else 1])

    def interval(self, name: str) -> tuple[float, float] | None:
        """The metric's CI (low, high), or None when it has none or a bound is null or non-finite."""
        low, high = self.value(name, "ci_low"), self.value(name, "ci_high")
        return None if low is None or high is None else (low, high)

    def components(self) -> dict[str, dict[str, Any]]:
        """The per-item scores by component ("general", "target", "mc.<task>"); see `item_components`."""
        return item_components(self.items)


class Results(BaseModel):
    """A whole results file. Keys a later version adds are kept as they are (extra="allow")."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    kind: str = KIND
    created: str | None = None
    suite: dict[str, Any] = Field(default_factory=dict, description="name, path and fingerprint")
    base: dict[str, Any] = Field(default_factory=dict, description="model, fingerprint, cache, forward_calls")
    versions: dict[str, Any] = Field(default_factory=dict)
    entries: list[Entry]
    lm_eval: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_lm_eval(self, handler) -> dict:
        data = handler(self)
        if self.lm_eval is None:
            data.pop("lm_eval", None)
        return data

    @classmethod
    def of(cls, data: "Results | dict", source: str | Path | None = None) -> "Results":
        """`data` itself, or the results payload it holds checked and typed; a problem is one
        UsageError line naming `source` (the file), the entry and the key."""
        if isinstance(data, Results):
            return data
        try:
            results = cls.model_validate(data)
        except ValidationError as exc:
            raise UsageError(_describe(exc, data, source)) from None
        path = Path(source) if source is not None else None
        for entry in results.entries:
            entry.read_from(path)
        return results

    def fingerprint(self, section: Literal["suite", "base"]) -> str | None:
        """The suite's or the base model's fingerprint, when the file records one."""
        return (getattr(self, section) or {}).get("fingerprint")

    def payload(self) -> dict:
        """The JSON object results.json holds."""
        return self.model_dump(mode="json")

    def write(self, path: str | Path) -> None:
        """Atomically, as `dumps` lays it out."""
        with atomic_path(path) as tmp:
            tmp.write_text(dumps(self.payload()))


def _describe(exc: ValidationError, data, source) -> str:
    """The first validation error in one line: the file, the entry by name, the key."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    where = f"{source}: " if source is not None else ""
    if len(loc) >= 2 and loc[0] == "entries" and isinstance(loc[1], int):
        entry = data["entries"][loc[1]]
        name = entry.get("name") if isinstance(entry, dict) else None
        where += f"results entry {name!r}: " if isinstance(name, str) else f"entries[{loc[1]}]: "
        if len(loc) >= 4 and loc[2] == "metrics":
            return where + f'metric {loc[3]} is not {{"value": number, "ci": [low, high]}} ({error["msg"]})'
        loc = loc[2:]
    key = ".".join(str(part) for part in loc if part not in ("float", "int")) or "the file"
    return where + f"{key}: {error['msg']}"


def load_results(path: str | Path) -> Results:
    """Read and check a results file; any problem is a one-line UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: results file not found")
    data = read_json(path, "results JSON file")
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise UsageError(f"{path}: not a workbench results file (no \"kind\": \"{KIND}\")")
    if data.get("schema_version") not in READS:
        raise UsageError(f"{path}: schema_version {data.get('schema_version')!r}, "
                         f"this workbench reads {' and '.join(map(str, READS))}")
    if not isinstance(data.get("entries"), list) or not data["entries"]:
        raise UsageError(f"{path}: no entries")
    return Results.of(data, path)


# --- per-item scores ---------------------------------------------------------------------------


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


def item_components(items) -> dict[str, dict[str, Any]]:
    """An entry's usable per-item components by name ("general", "target", "mc.<task>"): each a
    record with a string key and equal-length columns of finite numbers. Anything else is left
    out (its metrics are then not resampled), so a damaged or partial record never raises."""
    if not isinstance(items, dict):
        return {}
    flat = {name: items.get(name) for name in ("general", "target")}
    mc = items.get("mc")
    if isinstance(mc, dict):
        flat.update({f"mc.{task}": record for task, record in mc.items()})
    out = {}
    for name, record in flat.items():
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            continue
        columns = {k: v for k, v in record.items() if k != "key"}
        if columns and all(isinstance(v, list) and v and all(map(is_finite, v))
                           for v in columns.values()) and len({len(v) for v in columns.values()}) == 1:
            out[name] = {"key": record["key"], **columns}
    return out


# A list of numbers (or nulls) as `json.dumps(indent=2)` lays it out, one element per line. JSON
# strings hold no raw newline, so a match that spans lines is always a structural list.
_NUMBER_LIST = re.compile(r"\[\n\s+((?:-?[\d.eE+]+|null)(?:,\n\s+(?:-?[\d.eE+]+|null))*)\n\s*\]")


def dumps(results: dict) -> str:
    """results.json text: indented, with every list of numbers on one line (a CI, a ROC curve,
    a column of per-item scores), so 400 multiple-choice items take one line, not 400."""
    text = json.dumps(results, indent=2, default=str)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\s+", m.group(1))) + "]", text) + "\n"
