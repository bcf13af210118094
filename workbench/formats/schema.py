"""Validating a file's JSON against its pydantic schema, with the first problem as one line."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from workbench.errors import UsageError

M = TypeVar("M", bound=BaseModel)


def parsed(model: type[M], data: object, path: str | Path, what: str | None = None) -> M:
    """`data` as `model`, or a UsageError naming the file and the first bad key: "PATH: KEY: why",
    or "PATH: WHAT (KEY: why)" when `what` says what the file failed to be."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(map(str, error["loc"]))
        problem = f"{key}: {error['msg']}"
        raise UsageError(f"{path}: {problem}" if what is None else f"{path}: {what} ({problem})") from None
