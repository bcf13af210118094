"""Access to the LoRA factors of a PEFT model, shared by the delta penalties."""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from workbench.errors import UsageError

BASE_PREFIX = "base_model.model."


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The PeftModel, or the plain model when it has no adapter, inside DDP/FSDP/compile wrappers."""
    while not isinstance(model, PeftModel) and hasattr(model, "module"):
        model = model.module
    return model


def unwrap_peft(model: torch.nn.Module) -> PeftModel:
    """The PeftModel inside DDP/FSDP/compile wrappers."""
    model = unwrap(model)
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


_FACTOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


def check_adapter_fits(base: torch.nn.Module, adapter_file: str | Path) -> None:
    """A UsageError naming the adapter file, the first module and both shapes when a LoRA factor
    in the file does not fit the base's layer (A: [r, in features], B: [out features, r]).

    PEFT would stop on it with torch's "Error(s) in loading state_dict" that names neither the
    file nor what the adapter expected; the header's shapes are read without loading the tensors."""
    from safetensors import safe_open

    modules = dict(base.named_modules())
    with safe_open(str(adapter_file), "pt") as handle:
        for key in handle.keys():
            match = _FACTOR.match(key)
            layer = modules.get(match["module"]) if match else None
            if layer is None or not hasattr(layer, "in_features"):
                continue  # embeddings and modules the base lacks: PEFT's own check and _check_loaded
            shape = list(handle.get_slice(key).get_shape())
            side_in = match["side"] == "A"
            want, have = (shape[-1], layer.in_features) if side_in else (shape[0], layer.out_features)
            if want != have:
                raise UsageError(
                    f"{adapter_file}: does not fit this base model: {match['module']}.lora_{match['side']} is "
                    f"{shape}, for a layer of {want} {'inputs' if side_in else 'outputs'}, but the base's "
                    f"{match['module']} is [{layer.out_features}, {layer.in_features}] (out, in): the adapter "
                    "was trained on another base")


def _adapter_config(adapter_dir: str | Path) -> dict:
    """The adapter's `adapter_config.json`, or {} when it does not parse (the adapter's own check says why)."""
    import json

    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def recorded_base(adapter_dir: str | Path) -> str | None:
    """The base an adapter's `adapter_config.json` names (`base_model_name_or_path`), or None when
    it names none or the file does not parse."""
    name = _adapter_config(adapter_dir).get("base_model_name_or_path")
    return name if isinstance(name, str) and name else None


def check_one_method(adapter_dirs: list[Path]) -> None:
    """A UsageError when the adapters are of more than one PEFT method (LoRA and OSF): PEFT holds
    adapters of one method on a model, where it would stop with a ValueError."""
    methods: dict[str, Path] = {}
    for path in adapter_dirs:
        methods.setdefault(str(_adapter_config(path).get("peft_type", "LORA")), path)
    if len(methods) > 1:
        raise UsageError(f"{', '.join(f'{p} is {m}' for m, p in methods.items())}: PEFT holds adapters of one "
                         "method on a model; evaluate each method's runs in a call of their own")


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


def adapter_method(model: torch.nn.Module, adapter: str) -> str:
    """PEFT's name of the adapter's method: 'LORA' (DoRA included), 'OSF', ..."""
    kind = unwrap_peft(model).peft_config[adapter].peft_type
    return getattr(kind, "value", kind)  # PEFT's PeftType, a str enum


@contextlib.contextmanager
def adapter_scale(model: torch.nn.Module, factor: float) -> Iterator[None]:
    """Temporarily scale the active adapter toward the base: 0 = base, 1 = tuned.

    LoRA: W + t * s * B @ A, t of the weight change. DoRA (`use_dora`) computes its weight as
    m * V / ||V|| with V = W + s * B @ A (norms per output row), which at s = 0 is m * W / ||W||,
    not W: scaling s alone leaves the trained magnitude m on the base (on the tiny model, scale 0
    differed from the base by 0.87 against a full change of 1.10). So the magnitude moves too,
    from the base's row norms to the trained ones: m_t = ||W|| + t * (m - ||W||). t = 0 is the
    base exactly, t = 1 the adapter; in between, DoRA's path is not the straight line in weight
    space (docs/evals.md, "Adapter scales")."""
    peft_model = unwrap_peft(model)
    adapter = peft_model.active_adapter
    if factor != 1.0 and adapter_method(peft_model, adapter) != "LORA":
        raise UsageError(f"adapter scale {factor:g}: a {adapter_method(peft_model, adapter)} adapter has no scale "
                         "alpha / r to move it toward the base (OSF's change is U_low S_low V_low minus its "
                         "start); score it at scale 1 only")
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter in m.scaling]
    saved = [m.scaling[adapter] for m in layers]
    magnitudes = [(m.lora_magnitude_vector[adapter].weight, base_row_norms(m, adapter)) for m in layers
                  if factor != 1.0 and adapter in getattr(m, "lora_magnitude_vector", {})]
    trained = [weight.detach().clone() for weight, _ in magnitudes]
    with torch.no_grad():
        for module, scale in zip(layers, saved):
            module.scaling[adapter] = scale * factor
        for (weight, base), m in zip(magnitudes, trained):
            weight.copy_(base + factor * (m - base))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, scale in zip(layers, saved):
                module.scaling[adapter] = scale
            for (weight, _), m in zip(magnitudes, trained):
                weight.copy_(m)


def base_row_norms(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """The magnitude DoRA's weight has with the adapter off: the base weight's norm per output
    row, by PEFT's own `get_weight_norm` (with a zero low-rank term) over the dequantised weight."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.utils.integrations import dequantize_module_weight

    dora = layer.lora_magnitude_vector[adapter]
    if type(dora) is not DoraLinearLayer:  # PEFT's embedding and conv variants subclass it
        raise UsageError(f"DoRA on a {type(layer.get_base_layer()).__name__} layer ({type(dora).__name__}): its "
                         "adapter scales are not supported (linear layers only)")
    weight = dequantize_module_weight(layer.get_base_layer())
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    return dora.get_weight_norm(weight, zero, 0.0).to(dora.weight.dtype)


def scaled_delta_norm(model: torch.nn.Module, factor: float = 1.0) -> float:
    """Frobenius norm of the active adapter's whole weight change at scale `factor` (in float64):
    ||t * s * B @ A|| for LoRA (an r-by-r contraction), and for DoRA the change of its materialised
    weight m_t * V / ||V|| (`adapter_scale`), which is not linear in t; for OSF, t times the norm of
    PEFT's own `get_delta_weight` (U_low S_low V_low minus its start)."""
    from peft.tuners.osf import OSFLayer

    peft_model = unwrap_peft(model)
    adapter, total = peft_model.active_adapter, 0.0
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, OSFLayer) and adapter in module.osf_svd_params:
                total += float((module.get_delta_weight(adapter).double() ** 2).sum()) * factor ** 2
            if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
                continue
            A = module.lora_A[adapter].weight.double()
            B = module.lora_B[adapter].weight.double()
            scale = module.scaling[adapter] * factor
            if adapter not in getattr(module, "lora_magnitude_vector", {}):
                total += float(gram(A, B)) * scale ** 2
                continue
            from peft.utils.integrations import dequantize_module_weight
            from peft.utils.other import transpose

            base = transpose(dequantize_module_weight(module.get_base_layer()), module.fan_in_fan_out).double()
            m = module.lora_magnitude_vector[adapter].weight.double()
            m0 = base_row_norms(module, adapter).double()
            direction = base + scale * (B @ A)
            weight = ((m0 + factor * (m - m0)) / direction.norm(dim=1))[:, None] * direction
            total += float(((weight - base) ** 2).sum())
    return total ** 0.5


def scaled_magnitudes(model: torch.nn.Module, factor: float) -> dict[str, torch.Tensor]:
    """The DoRA magnitudes of the active adapter at scale `factor` (`adapter_scale`), keyed as
    PEFT saves them (`base_model.model.<module>.lora_magnitude_vector`): what a scaled adapter
    file holds in place of the trained ones. Empty for plain LoRA."""
    peft_model = unwrap_peft(model)
    adapter, out = peft_model.active_adapter, {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_magnitude_vector", {}):
                m, m0 = module.lora_magnitude_vector[adapter].weight, base_row_norms(module, adapter)
                out[f"{name}.lora_magnitude_vector"] = (m0 + factor * (m - m0)).detach().cpu().contiguous()
    return out
