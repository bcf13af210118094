"""The recipe schema of each loss-side regularizer, by the name a recipe uses for it. No torch.

`workbench.training.regularizers` implements each one and registers the implementation under
the same name; `config.recipe` builds its `regularizers` section from `PENALTY_CONFIGS`, so a
new penalty is a config class here plus an implementation there (a test checks the two match).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PenaltyConfig(BaseModel):
    """Fields every penalty has. Subclasses add their own knobs, and their docstring is the
    description of their key in the recipe's `regularizers` section."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(default=0.0, ge=0.0, description="Multiplier of the penalty in the loss; 0 switches "
                          "it off, as leaving its section out does.")


class KLConfig(PenaltyConfig):
    """KL between the base's and the tuned model's next-token distributions, the mean per completion
    token; the base is the same model with the adapter switched off."""

    weight: float = Field(default=0.1, ge=0.0, description="Multiplier of the KL in the loss; with `target` "
                          "set, the controller's starting value.")
    direction: Literal["forward", "reverse"] = Field(
        default="forward", description="forward: KL(base || tuned), the base's distribution weighting each token; "
        "reverse: KL(tuned || base), which needs reference: model.")
    temperature: float = Field(default=1.0, gt=0.0, description="Divides both sides' logits before the softmax; "
                               "1 compares the distributions the models sample from.")
    warmup_steps: int = Field(default=0, ge=0, description="Optimiser steps over which the weight ramps "
                              "linearly from 0; 0 starts at full weight. Excludes `target`.")
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
    """Elastic weight consolidation on the LoRA delta: weight/2 * sum(F * dW^2), F the Fisher of the
    LoRA-targeted base weights."""

    weight: float = Field(default=100.0, ge=0.0, description="lambda in lambda/2 * sum(F * dW^2), dW = scale * "
                          "B @ A the LoRA delta.")
    fisher: str | None = Field(default=None, description="A Fisher saved by `workbench fisher` (.safetensors), "
                               "refused if its base or target modules differ; default: estimated from `reference`.")
    estimator: Literal["kfac_diag", "diag"] = Field(
        default="kfac_diag", description="kfac_diag: F_ij = G_i * A_j, two vectors a module (output-gradient and "
        "input second moments); diag: the exact per-example diagonal, for small models and checks.")
    reference: str | None = Field(default=None, description="Data the Fisher is estimated on when `fisher` is "
                                  "unset (e.g. builtin:pydoc), once, then cached by fingerprint.")
    num_examples: int = Field(default=64, ge=1, description="Reference examples the Fisher averages over.")
    max_length: int = Field(default=256, ge=8, description="Tokens per reference example (longer ones are cut).")
    batch_size: int = Field(default=4, ge=1, description="Reference examples per forward pass while estimating; "
                            "the Fisher is per-example either way.")


class DeltaL2Config(PenaltyConfig):
    """sum ||scale * B @ A||_F^2 over adapted modules: shrinks the weight change toward the base."""


PENALTY_CONFIGS: dict[str, type[PenaltyConfig]] = {
    "kl_to_base": KLConfig,
    "ewc": EWCConfig,
    "delta_l2": DeltaL2Config,
}
