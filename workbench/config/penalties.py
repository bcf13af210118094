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
    weight: float = Field(default=0.1, ge=0.0, description="Multiplier of the KL in the loss; with `target` "
                          "set, the controller's starting value.")
    direction: Literal["forward", "reverse"] = "forward"
    temperature: float = Field(default=1.0, gt=0.0)
    warmup_steps: int = Field(default=0, ge=0, description="Ramp the weight linearly from 0.")
    reference: Literal["model", "topk_cache"] = Field(
        default="model", description="model: the base's forward pass at every step (exact KL). topk_cache: "
        "the base's top-k log-probs on the training set, computed once and cached across epochs and "
        "recipes; the KL's base tail is then lumped into one outcome (a lower bound).")
    top_k: int = Field(default=256, ge=1, description="Log-probs per token kept by reference: topk_cache.")
    target: float | None = Field(
        default=None, gt=0.0, description="A budget: the KL per completion token (nats) to hold. After every "
        "optimiser step the weight is adapted toward it (log w += target_gain * e, e the relative error "
        "clipped to +-0.2), starting from `weight` and kept within [weight_min, weight_max].")
    target_gain: float = Field(default=0.3, gt=0.0, description="With `target`: the change of log(weight) per "
                               "step per unit of relative error, so at most a factor exp(0.2 x gain) a step "
                               "(6% at 0.3). Measured on the tiny model in docs/regularizers.md.")
    weight_min: float = Field(default=1e-3, gt=0.0, description="With `target`: the lowest weight.")
    weight_max: float = Field(default=1e3, gt=0.0, description="With `target`: the highest weight.")

    @model_validator(mode="after")
    def _consistent(self) -> "KLConfig":
        if self.reference == "topk_cache" and self.direction != "forward":
            raise ValueError("reference: topk_cache supports direction: forward only (the reverse KL "
                             "weighs every token by the tuned model, so it needs the base's whole distribution)")
        if self.target is None:
            return self
        if self.weight_min > self.weight_max:
            raise ValueError(f"weight_min {self.weight_min:g} is above weight_max {self.weight_max:g}")
        if not self.weight_min <= self.weight <= self.weight_max:
            raise ValueError(f"with a target, weight is the controller's starting value and must lie in "
                             f"[weight_min, weight_max] = [{self.weight_min:g}, {self.weight_max:g}], "
                             f"got {self.weight:g}")
        if self.warmup_steps:
            raise ValueError("target and warmup_steps exclude each other: with a target the controller sets "
                             "the weight (and lowers it anyway while the KL is below its target)")
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
