"""EWC on the LoRA delta: weight/2 * sum(F * dW**2), with dW = scale * B @ A.

With the K-FAC diagonal Fisher F_ij = g_i * a_j the sum is an r-by-r computation per module
(see `gram`), so the penalty never materialises an out-by-in matrix.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import Penalty, PenaltyConfig, register
from .lora_delta import gram, lora_factors


class EWCConfig(PenaltyConfig):
    weight: float = Field(default=100.0, ge=0.0, description="lambda in lambda/2 * sum(F dW^2).")
    fisher: str | None = Field(default=None, description="A saved Fisher (.safetensors).")
    estimator: Literal["kfac_diag", "diag"] = "kfac_diag"
    reference: str | None = Field(default=None, description="Data to estimate the Fisher on.")
    num_examples: int = Field(default=64, ge=1)
    max_length: int = Field(default=256, ge=8)
    batch_size: int = Field(default=4, ge=1)


@register
class EWC(Penalty):
    name = "ewc"
    Config = EWCConfig

    def __init__(self, config: EWCConfig, fisher: dict[str, torch.Tensor] | None = None, **_):
        super().__init__(config)
        if fisher is None:
            raise ValueError("EWC needs a Fisher: pass fisher=... (see workbench.fisher)")
        self.fisher = fisher
        self._device: torch.device | None = None

    def _fisher_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The Fisher on the adapter's device, moved once rather than every step (O(1) per call:
        it is asked once per LoRA module per step)."""
        if device != self._device:
            self.fisher = {k: t.to(device) for k, t in self.fisher.items()}
            self._device = device
        return self.fisher

    def penalty(self, model, inputs, outputs) -> torch.Tensor:
        terms = []
        for f in lora_factors(model):
            A, B = f.A.float(), f.B.float()
            fisher = self._fisher_on(A.device)
            if f"{f.key}.diag" in fisher:
                terms.append(f.scale**2 * (fisher[f"{f.key}.diag"] * (B @ A) ** 2).sum())
            else:
                terms.append(f.scale**2 * gram(A, B, fisher[f"{f.key}.g"], fisher[f"{f.key}.a"]))
        return 0.5 * torch.stack(terms).sum()
