"""`calibration.json`: what `workbench calibrate` writes next to the scaled adapter: the search
for the largest adapter scale whose eval passes a gate policy, step by step. The layout is
documented in docs/results.md; keys a later version adds are kept as they are (extra="allow").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from workbench.errors import UsageError
from workbench.formats.schema import parsed
from workbench.io import read_json

KIND = "workbench.calibration"
SCHEMA_VERSION = 1


class Failing(BaseModel):
    """A check that failed at a scale: the rule as written, the metric, what was observed."""

    model_config = ConfigDict(extra="allow")

    rule: str
    metric: str
    observed: float | None
    status: str


class Step(BaseModel):
    """One scored scale of the search."""

    model_config = ConfigDict(extra="allow")

    scale: float
    passed: bool
    failing: list[Failing] = []


class Calibration(BaseModel):
    """A whole calibration.json."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    kind: str = KIND
    created: str | None = None
    adapter: str
    run: str | None = None
    name: str
    family: str
    suite: dict[str, Any]
    base: dict[str, Any]
    policy: dict[str, Any]
    tolerance: float
    steps: list[Step]
    chosen_scale: float
    fails_at: float | None = None

    def payload(self) -> dict:
        return self.model_dump(mode="json")


def read_calibration(path: str | Path) -> Calibration:
    """A calibration.json, or a one-line UsageError naming the file and the key."""
    path = Path(path)
    data = read_json(path, "calibration.json")
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise UsageError(f"{path}: not a calibration.json (no \"kind\": \"{KIND}\")")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{path}: calibration.json schema_version {data.get('schema_version')!r}; "
                         f"this workbench reads {SCHEMA_VERSION}")
    return parsed(Calibration, data, path)
