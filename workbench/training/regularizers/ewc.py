"""EWC on the LoRA delta: weight/2 * sum(F * dW**2), with dW = scale * B @ A.

With the K-FAC diagonal Fisher F_ij = g_i * a_j the sum is an r-by-r computation per module
(see `gram`), so the penalty never materialises an out-by-in matrix. Modules with the same shapes
are stacked and contracted in one batched call (`grouped_factors`), their Fishers stacked once.
"""

from __future__ import annotations

import torch

from workbench.config.penalties import EWCConfig
from workbench.training.regularizers.base import Penalty, register
from workbench.modeling.lora import FactorGroup, grouped_factors, grouped_gram, without_autocast


@register
class EWC(Penalty):
    name = "ewc"
    Config = EWCConfig

    @classmethod
    def needs(cls, config: EWCConfig) -> tuple[str, ...]:
        return ("fisher",)

    def __init__(self, config: EWCConfig, fisher: dict[str, torch.Tensor] | None = None, **_):
        super().__init__(config)
        if fisher is None:
            raise ValueError("EWC needs a Fisher: pass fisher=... (see workbench.training.fisher)")
        self.fisher = dict(fisher)  # entries are popped as they are stacked
        self._stacked: dict[tuple[str, ...], tuple[torch.Tensor, ...]] = {}

    def _stacked_fisher(self, group: FactorGroup) -> tuple[torch.Tensor, ...]:
        """The group's Fisher stacked in its module order, on its device: (diag [G, out, in],) or
        (g [G, out], a [G, in]). Built once; the per-module tensors are then dropped, so an exact
        diagonal (as large as the adapted weights) is not held twice."""
        stacked = self._stacked.get(group.keys)
        if stacked is None:
            kinds = ("diag",) if f"{group.keys[0]}.diag" in self.fisher else ("g", "a")
            stacked = tuple(torch.stack([self.fisher.pop(f"{k}.{kind}") for k in group.keys]).float()
                            for kind in kinds)
        if stacked[0].device != group.A.device:
            stacked = tuple(t.to(group.A.device) for t in stacked)
        self._stacked[group.keys] = stacked
        return stacked

    def term(self, model, inputs, base) -> torch.Tensor:
        terms = []
        for group in grouped_factors(model):
            fisher = self._stacked_fisher(group)
            if len(fisher) == 1:  # the exact diagonal: out x in per module
                with without_autocast(group.A.device):
                    per_module = (fisher[0] * (group.B @ group.A) ** 2).sum((1, 2))
            else:
                per_module = grouped_gram(group.A, group.B, *fisher)
            terms.append((group.scale**2 * per_module).sum())
        return 0.5 * torch.stack(terms).sum()
