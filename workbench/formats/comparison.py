"""`compare.json`: what `workbench compare --out` writes and what `workbench report` and
`workbench summarize` read, checked and typed here. The layout is documented in docs/compare.md.

Every number is in its metric's own units; a difference is family - reference at a matched
learning level. Keys a later version adds are kept as they are (extra="allow").
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from workbench.errors import UsageError
from workbench.formats.schema import parsed
from workbench.io import read_json

KIND = "workbench.compare"
SCHEMA_VERSION = 1


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class Estimate(_Part):
    """A front's value at a level: the mean over seeds, its se, and whether it rests on a metric
    recorded without a CI (its se of 0 assumed, not measured)."""

    value: float
    se: float
    n_seeds: int | None = None
    value_only: bool = False


class Difference(_Part):
    """family - reference at a level, with its se and 95% CI."""

    value: float
    se: float
    ci: tuple[float, float]


class Row(_Part):
    level: str
    learning: float | None
    reference: Estimate | None = None
    family: Estimate | None = None
    difference: Difference | None = None
    verdict: str | None = None
    note: str | None = None


class MetricRows(_Part):
    """One forgetting metric of one family: its verdict over the levels and a row per level."""

    metric: str
    higher_is_better: bool
    verdict: str
    summary: str
    method: str = ""
    rows: list[Row]


class Level(_Part):
    level: str
    learning: float


class Group(_Part):
    """A family's points: its seeds, how many entries, the learning span every seed reaches."""

    family: str
    seeds: list[int]
    points: int
    span: tuple[float, float] | None = None


class FamilyRows(Group):
    levels: list[Level]
    metrics: list[MetricRows]


class Axis(_Part):
    metric: str
    higher_is_better: bool


class Comparison(_Part):
    """A whole compare.json."""

    kind: str = KIND
    schema_version: int = SCHEMA_VERSION
    created: str | None = None
    inputs: list[str] = []
    learning: Axis
    forgetting: list[Axis]
    forgetting_left_out: list[str] = []
    reference: Group
    levels_requested: int | None = None
    z: float | None = None
    uncertainty: dict = {}
    families: list[FamilyRows]


def validated(data: dict) -> dict:
    """The JSON `workbench compare --out` writes, checked against the schema its readers read
    (a non-finite number is written as null)."""
    return Comparison.model_validate(data).model_dump(mode="json")


def read_comparison(path: str | Path, reader: str, data: dict | None = None) -> Comparison:
    """A compare.json (its JSON `data` when already read), or a one-line UsageError naming the
    file: another kind of file, another schema version, or a key missing or of the wrong type."""
    path = Path(path)
    data = read_json(path, "compare.json") if data is None else data
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind != KIND:
        hint = ("; it is a results file: run `workbench compare` on it with --out, and name that file"
                if kind == "workbench.eval" else "")
        raise UsageError(f"{path}: not a compare.json (kind {kind!r}, not {KIND!r}){hint}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{path}: compare.json schema_version {data.get('schema_version')!r}; "
                         f"{reader} reads {SCHEMA_VERSION} (rerun workbench compare)")
    return parsed(Comparison, data, path, f"not a workbench.compare file of schema {SCHEMA_VERSION}")
