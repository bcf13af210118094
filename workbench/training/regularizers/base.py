"""The contract every loss-side regularizer follows, and the registry the recipe reads names from."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

PENALTIES: dict[str, type["Penalty"]] = {}


class PenaltyConfig(BaseModel):
    """Fields every penalty has. Subclasses add their own knobs."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(default=0.0, ge=0.0, description="Multiplier of the penalty in the loss.")


class Penalty:
    """A term added to the task loss: `loss = task + sum(weight(step) * penalty(...))`.

    `per_token` penalties return a mean over completion tokens and are renormalised by the trainer
    the same way as the task loss (so gradient accumulation and data parallelism count every
    token once); parameter penalties return one value per optimisation step.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PenaltyConfig]] = PenaltyConfig
    per_token: ClassVar[bool] = False

    def __init__(self, config: PenaltyConfig, **context: Any):
        self.config = config

    def weight(self, step: int) -> float:
        return self.config.weight

    def penalty(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> torch.Tensor:
        raise NotImplementedError


def register(cls: type[Penalty]) -> type[Penalty]:
    """Class decorator: make a penalty available to recipes under `cls.name`."""
    if cls.name in PENALTIES:
        raise ValueError(f"penalty {cls.name!r} is registered twice")
    PENALTIES[cls.name] = cls
    return cls
