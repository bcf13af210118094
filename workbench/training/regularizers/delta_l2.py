"""L2 on the LoRA delta: sum over adapted modules of ||scale * B @ A||_F^2, in closed form."""

from __future__ import annotations

import torch

from workbench.config.penalties import DeltaL2Config
from workbench.training.regularizers.base import Penalty, register
from workbench.modeling.lora import grouped_factors, grouped_gram


@register
class DeltaL2(Penalty):
    """Unlike weight decay on A and B, this shrinks the weight change itself toward the base."""

    name = "delta_l2"
    Config = DeltaL2Config

    def term(self, model, inputs, base) -> torch.Tensor:
        return torch.stack([(g.scale**2 * grouped_gram(g.A, g.B)).sum() for g in grouped_factors(model)]).sum()
