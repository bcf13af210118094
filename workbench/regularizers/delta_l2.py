"""L2 on the LoRA delta: sum over adapted modules of ||scale * B @ A||_F^2, in closed form."""

from __future__ import annotations

import torch

from .base import Penalty, register
from .lora_delta import gram, lora_factors


@register
class DeltaL2(Penalty):
    """Unlike weight decay on A and B, this shrinks the weight change itself toward the base."""

    name = "delta_l2"

    def penalty(self, model, inputs, outputs) -> torch.Tensor:
        terms = [f.scale**2 * gram(f.A.float(), f.B.float()) for f in lora_factors(model)]
        return torch.stack(terms).sum()
