"""The contract every loss-side regularizer follows, and the registry of implementations by name."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from workbench.config.penalties import PENALTY_CONFIGS, PenaltyConfig
from workbench.training.engine import BaseReference
from workbench.training.terms import TokenTerm

PENALTIES: dict[str, type["Penalty"]] = {}


class Penalty:
    """A term added to the task loss: `loss = task + sum(weight(step) * term(...))`.

    `per_token` penalties are summed over completion tokens and normalised by the trainer the same
    way as the task loss (so gradient accumulation and data parallelism count every token once);
    parameter penalties count once per optimisation step. `monitors`: the trainer's monitors whose
    value this penalty's term equals, so they are not measured twice.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PenaltyConfig]] = PenaltyConfig
    per_token: ClassVar[bool] = False

    def __init__(self, config: PenaltyConfig, **context: Any):
        self.config = config

    def weight(self, step: int) -> float:
        return self.config.weight

    @property
    def monitors(self) -> frozenset[str]:
        """The trainer's monitors (`training.terms.TRAIN_KL`) whose value this penalty's term equals."""
        return frozenset()

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

    @classmethod
    def needs(cls, config: PenaltyConfig) -> tuple[str, ...]:
        """What the penalty must be given to be built, by name, passed to `__init__` as keywords:
        "fisher" (the EWC Fisher of the base), "reference_cache" (a top-k cache of the base's
        log-probs over the training set). The run makes each once (`training.run`)."""
        return ()

    def term(self, model: torch.nn.Module, inputs: dict, base: BaseReference) -> torch.Tensor | TokenTerm:
        """The penalty on this micro-batch. A `per_token` penalty returns a per-chunk term of the
        tuned logits (`training.terms.TokenTerm`), which the loss engine sums over the batch's
        completion tokens and the trainer normalises like the task loss; it may call `base()` for
        the base's side of this batch, computed once per micro-batch whoever asks. A parameter
        penalty returns its value, counted once per optimiser step."""
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
