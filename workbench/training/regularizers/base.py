"""The contract every loss-side regularizer follows, and the registry of implementations by name."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from workbench.config.penalties import PENALTY_CONFIGS, PenaltyConfig

PENALTIES: dict[str, type["Penalty"]] = {}


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
    if PENALTY_CONFIGS.get(cls.name) is not cls.Config:
        raise ValueError(f"penalty {cls.name!r}: its Config must be PENALTY_CONFIGS[{cls.name!r}] "
                         "in workbench/config/penalties.py (the recipe schema is built from there)")
    PENALTIES[cls.name] = cls
    return cls
