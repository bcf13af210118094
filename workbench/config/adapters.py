"""What an adapter method other than LoRA cannot be combined with, and why. No torch.

`lora.method: osf` is PEFT's Orthogonal Subspace Fine-tuning: each target W = U S V^T is split by
its singular values; the top directions are frozen, the bottom r (U_low, S_low, V_low) train, and
the change is U_low S_low V_low - (their values at the start). There are no factors B and A, no
scale alpha / r and no dropout, so every feature built on those is refused with its reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.config.recipe import Recipe

ON_LORA_FACTORS = ("ewc", "delta_l2")  # penalties on dW = scale * B @ A (modeling.lora.lora_factors)


def osf_clashes(recipe: "Recipe") -> str:
    """The settings of `recipe` that OSF cannot run with, each with why, joined by '; ' ('' if none)."""
    reg = recipe.regularizers
    clashes = [f"regularizers.{name}: it acts on LoRA's factors B @ A, which OSF has not"
               for name in ON_LORA_FACTORS if name in recipe.penalties()]
    if recipe.lora.init != "default":
        clashes.append(f"lora.init {recipe.lora.init}: the inits set LoRA's A and B; OSF starts from the "
                       "weight's own singular vectors")
    if reg.lora_dropout:
        clashes.append("regularizers.lora_dropout: OSF's branch has no dropout")
    if reg.weight_decay:
        clashes.append("regularizers.weight_decay: decay would shrink the trained singular components toward "
                       "zero, away from the base (under LoRA it shrinks B @ A toward the base)")
    if recipe.model.load_in_4bit:
        clashes.append("model.load_in_4bit: OSF takes the SVD of each weight, which a 4-bit base holds packed")
    return "; ".join(clashes)
