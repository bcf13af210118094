"""Which modules a LoRA adapter targets: names, or a preset resolved against the model's layers.

Presets are resolved here, not by PEFT's `all-linear`, because CorDA's preprocessing matches the
target names literally, and because attention and MLP blocks share leaf names in some
architectures (GPT-2's `c_proj` is in both): a preset becomes the `block.leaf` suffixes of the
linear layers it covers, e.g. `self_attn.q_proj`, `mlp.c_proj`.
"""

from __future__ import annotations

import torch

from workbench.errors import UsageError

ATTENTION = ("attn", "attention")  # a parent module named like this is an attention block
MLP = ("mlp", "feed_forward", "ffn")


def _linear(module: torch.nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's linear layers, weights stored transposed)."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def linear_layers(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers an adapter may target: every one but the LM head."""
    head = model.get_output_embeddings()
    return [name for name, module in model.named_modules() if _linear(module) and module is not head]


def resolve_targets(model: torch.nn.Module, spec: str | list[str]) -> list[str]:
    """The target_modules for PEFT: listed names (each must match a module), or a preset's suffixes."""
    if not isinstance(spec, str):
        _check_listed(model, spec)
        return list(spec)
    names = linear_layers(model)
    if spec == "all-linear":
        chosen = sorted({n.rsplit(".", 1)[-1] for n in names})
    else:
        words = ATTENTION if spec == "attention" else MLP
        chosen = sorted({".".join(n.split(".")[-2:]) for n in names
                         if any(w in part for part in n.split(".")[:-1] for w in words)})
    if not chosen:
        raise UsageError(f"lora.target_modules {spec}: no linear layer of {type(model).__name__} is "
                         f"inside a block named like {' or '.join(ATTENTION if spec == 'attention' else MLP)}; "
                         "list the module names instead")
    return chosen


def check_layers(model: torch.nn.Module, layers: list[int] | None) -> None:
    """`lora.layers` must lie inside the model's decoder layers."""
    count = model.config.num_hidden_layers
    if layers is not None and layers[-1] >= count:
        raise UsageError(f"lora.layers {layers[0]}-{layers[-1]}: {type(model).__name__} has {count} decoder "
                         f"layers, numbered 0-{count - 1}")


def _check_listed(model: torch.nn.Module, targets: list[str]) -> None:
    """Every listed name must match a module (PEFT only complains when none does)."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n in linear_layers(model)})
        raise UsageError(f"lora.target_modules: no module named {', '.join(map(repr, missing))} in the "
                         f"model (its linear layers: {', '.join(linear)}; or use 'all-linear')")
