"""The contract every loss-side regularizer follows, and the registry of implementations by name."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

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

    @property
    def controlled(self) -> bool:
        """Whether `update` adapts the weight: then the trainer calls it once per optimiser step,
        logs the weight in force as `<name>_weight`, and checkpoints `state_dict()`."""
        return False

    def update(self, measured: float) -> None:
        """After each optimiser step: the step's unweighted term, reduced like the logged one (the
        mean over the step's micro-batches, normalised like the task loss, and over ranks)."""

    def state_dict(self) -> dict:
        """What a resumed run needs to continue with the same weight (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def penalty(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> torch.Tensor:
        raise NotImplementedError

    def token_term(self, model: torch.nn.Module, inputs: dict) -> Callable | None:
        """A `per_token` penalty as a function over chunks of the tuned logits, for the fused loss
        head (`training.head.TokenTerm`: term(z [n, V], start, index) -> (the term summed over the
        chunk, its gradient in z)); the trainer divides the sum by the batch's completion tokens.
        Called once per micro-batch, so per-batch work (a reference forward) happens here. None:
        the penalty needs the whole logits, and training with it uses the full head."""
        return None


def register(cls: type[Penalty]) -> type[Penalty]:
    """Class decorator: make a penalty available to recipes under `cls.name`."""
    if cls.name in PENALTIES:
        raise ValueError(f"penalty {cls.name!r} is registered twice")
    if PENALTY_CONFIGS.get(cls.name) is not cls.Config:
        raise ValueError(f"penalty {cls.name!r}: its Config must be PENALTY_CONFIGS[{cls.name!r}] "
                         "in workbench/config/penalties.py (the recipe schema is built from there)")
    PENALTIES[cls.name] = cls
    return cls
