"""The recipe schema of each loss-side regularizer, by the name a recipe uses for it. No torch.

`workbench.training.regularizers` implements each one and registers the implementation under
the same name; `config.recipe` builds its `regularizers` section from `PENALTY_CONFIGS`, so a
new penalty is a config class here plus an implementation there (a test checks the two match).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PenaltyConfig(BaseModel):
    """Fields every penalty has. Subclasses add their own knobs."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(default=0.0, ge=0.0, description="Multiplier of the penalty in the loss.")


class KLConfig(PenaltyConfig):
    weight: float = Field(default=0.1, ge=0.0)
    direction: Literal["forward", "reverse"] = "forward"
    temperature: float = Field(default=1.0, gt=0.0)
    warmup_steps: int = Field(default=0, ge=0, description="Ramp the weight linearly from 0.")
    chunk_size: int = Field(default=1024, ge=1, description="Tokens per log-softmax chunk.")
    reference: Literal["model", "topk_cache"] = Field(
        default="model", description="model: the base's forward pass at every step (exact KL). topk_cache: "
        "the base's top-k log-probs on the training set, computed once and cached across epochs and "
        "recipes; the KL's base tail is then lumped into one outcome (a lower bound).")
    top_k: int = Field(default=256, ge=1, description="Log-probs per token kept by reference: topk_cache.")

    @model_validator(mode="after")
    def _cache_needs_forward(self) -> "KLConfig":
        if self.reference == "topk_cache" and self.direction != "forward":
            raise ValueError("reference: topk_cache supports direction: forward only (the reverse KL "
                             "weighs every token by the tuned model, so it needs the base's whole distribution)")
        return self


class EWCConfig(PenaltyConfig):
    weight: float = Field(default=100.0, ge=0.0, description="lambda in lambda/2 * sum(F dW^2).")
    fisher: str | None = Field(default=None, description="A saved Fisher (.safetensors).")
    estimator: Literal["kfac_diag", "diag"] = "kfac_diag"
    reference: str | None = Field(default=None, description="Data to estimate the Fisher on.")
    num_examples: int = Field(default=64, ge=1)
    max_length: int = Field(default=256, ge=8)
    batch_size: int = Field(default=4, ge=1)


class DeltaL2Config(PenaltyConfig):
    """sum ||scale * B @ A||_F^2 over adapted modules: shrinks the weight change toward the base."""


PENALTY_CONFIGS: dict[str, type[PenaltyConfig]] = {
    "kl_to_base": KLConfig,
    "ewc": EWCConfig,
    "delta_l2": DeltaL2Config,
}
