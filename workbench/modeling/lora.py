"""Access to the LoRA factors of a PEFT model, shared by the delta penalties."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator, NamedTuple

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

BASE_PREFIX = "base_model.model."


def unwrap_peft(model: torch.nn.Module) -> PeftModel:
    """The PeftModel inside DDP/compile wrappers."""
    while not isinstance(model, PeftModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a PEFT model, got {type(model).__name__}")
    return model


class LoraFactors(NamedTuple):
    """dW = scale * B @ A for the base weight named `key` (its name in the un-wrapped model)."""

    key: str
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float


def lora_factors(model: torch.nn.Module) -> Iterator[LoraFactors]:
    """Every active linear LoRA adapter in the model, keyed by base-model module name."""
    peft_model = unwrap_peft(model)
    adapter = peft_model.active_adapter
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            key = name.removeprefix(BASE_PREFIX)
            yield LoraFactors(key, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                              module.scaling[adapter])


def gram(A: torch.Tensor, B: torch.Tensor, g: torch.Tensor | None = None,
         a: torch.Tensor | None = None) -> torch.Tensor:
    """sum_ij g_i a_j (B @ A)_ij^2 as an r-by-r contraction: sum((B.T diag(g) B) * (A diag(a) A.T)).

    A: [r, in], B: [out, r], g: [out], a: [in]; g = a = 1 gives the squared Frobenius norm.
    """
    return grouped_gram(A[None], B[None], None if g is None else g[None], None if a is None else a[None])[0]


class FactorGroup(NamedTuple):
    """LoRA modules whose factors have the same shapes, stacked so one batched contraction covers
    them all: a step then costs a few kernels per shape rather than a few per module."""

    keys: tuple[str, ...]
    A: torch.Tensor  # [G, r, in], fp32
    B: torch.Tensor  # [G, out, r], fp32
    scale: torch.Tensor  # [G]


def grouped_factors(model: torch.nn.Module) -> list[FactorGroup]:
    """`lora_factors` grouped by factor shapes, in model order; differentiable in A and B."""
    groups: dict[tuple, list[LoraFactors]] = defaultdict(list)
    for f in lora_factors(model):
        groups[f.A.shape, f.B.shape, f.A.device].append(f)
    return [FactorGroup(tuple(f.key for f in fs), torch.stack([f.A for f in fs]).float(),
                        torch.stack([f.B for f in fs]).float(),
                        torch.tensor([f.scale for f in fs], device=fs[0].A.device))
            for fs in groups.values()]


def grouped_gram(A: torch.Tensor, B: torch.Tensor, g: torch.Tensor | None = None,
                 a: torch.Tensor | None = None) -> torch.Tensor:
    """`gram` for a stack of modules: A [G, r, in], B [G, out, r], g [G, out], a [G, in] -> [G].
    In fp32 also under bf16 autocast (`without_autocast`)."""
    with without_autocast(A.device):
        B_side = B.transpose(1, 2) @ (B if g is None else g[:, :, None] * B)
        A_side = (A if a is None else A * a[:, None, :]) @ A.transpose(1, 2)
        return (B_side * A_side).sum((1, 2))


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision (train.bf16) runs the step under autocast, which would run a penalty's
    matmuls in bf16 (8 mantissa bits: EWC off by ~0.4% of its value, docs/precision.md); the
    parameter penalties are fp32 sums of squares, so they run with it off."""
    return torch.autocast(device.type, enabled=False)


@contextlib.contextmanager
def as_base(model: torch.nn.Module, grad: bool = False) -> Iterator[PeftModel]:
    """Score as the base: the same weights with the adapter disabled, in eval mode (no dropout,
    no NEFTune noise) and without autograd unless `grad` (the Fisher needs the base's gradients);
    the mode is restored after. Yields the PeftModel. Never a second copy of the model."""
    peft_model = unwrap_peft(model)
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter(), contextlib.nullcontext() if grad else torch.no_grad():
            yield peft_model
    finally:
        peft_model.train(was_training)


@contextlib.contextmanager
def adapter_scale(model: torch.nn.Module, factor: float) -> Iterator[None]:
    """Temporarily multiply every active LoRA delta by `factor` (0 = base, 1 = tuned)."""
    peft_model = unwrap_peft(model)
    adapter = peft_model.active_adapter
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter in m.scaling]
    saved = [m.scaling[adapter] for m in layers]
    for module, scale in zip(layers, saved):
        module.scaling[adapter] = scale * factor
    try:
        yield
    finally:
        for module, scale in zip(layers, saved):
            module.scaling[adapter] = scale
