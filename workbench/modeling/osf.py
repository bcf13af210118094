"""Orthogonal Subspace Fine-tuning (`lora.method: osf`) through PEFT's own tuner (`peft.tuners.osf`).

Each target W = U S V^T is split by its singular values: the top min(out, in) - r directions stay
frozen, the bottom r (U_low [out, r], S_low [r], V_low [r, in], starting as W's own) train, with
PEFT's gradient hooks keeping U_low and V_low orthogonal to the frozen directions. The change is
U_low S_low V_low minus its start, so the model starts as the base and `disable_adapter()` is the
base (what KL-to-base, the retention probe and the evals' base side use). A module trains
r (out + in) + r parameters: LoRA's count at rank r plus the r singular values, so `lora.r` buys
the same budget under both methods.

PEFT takes one preserved rank `effective_rank` for every target (an int, or a fraction of the
smaller dimension); a trainable rank r is a preserved rank per module shape, so each target gets
its own `rank_pattern` entry, anchored on its full name. The saved adapter_config.json carries
them, so plain `PeftModel.from_pretrained` rebuilds the same shapes; the file holds the trained
U_low, S_low, V_low, and PEFT recomputes their start from the base's SVD on load (the product
U0 S0 V0 is the same whichever signs the SVD picks).
"""

from __future__ import annotations

import re
import warnings

import torch
from peft import LoraConfig, OSFConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists

from workbench.config.recipe import LoraSection
from workbench.errors import UsageError
from workbench.modeling.targets import check_layers, resolve_targets


def osf_targets(model: torch.nn.Module, lora: LoraSection) -> dict[str, torch.nn.Linear]:
    """The modules `lora.target_modules` and `lora.layers` pick, matched by PEFT's own rule (as a
    LoRA config with `layers_to_transform`), by full name; each must be a torch Linear (OSF's only
    layer type) with more than `lora.r` singular directions."""
    layers = lora.layer_indices()
    check_layers(model, layers)
    match = LoraConfig(target_modules=resolve_targets(model, lora.target_modules), layers_to_transform=layers)
    chosen = {name: module for name, module in model.named_modules()
              if name and check_target_module_exists(match, name)}
    for name, module in chosen.items():
        if not isinstance(module, torch.nn.Linear):
            raise UsageError(f"lora.method osf: {name} is a {type(module).__name__}; PEFT's OSF adapts "
                             "torch.nn.Linear layers only")
        if lora.r >= min(module.weight.shape):
            out, inp = module.weight.shape
            raise UsageError(f"lora.r {lora.r} with lora.method osf: {name} is {out}x{inp}, so at most "
                             f"{min(out, inp) - 1} of its singular directions can train (one stays frozen)")
    return chosen


def apply_osf(model: torch.nn.Module, lora: LoraSection) -> PeftModel:
    """Wrap `model` (in place) in an OSF adapter named 'default' training r singular directions of
    every target; only the osf_svd_params train."""
    targets = osf_targets(model, lora)
    config = OSFConfig(target_modules=sorted(targets), task_type="CAUSAL_LM",
                       rank_pattern={f"^{re.escape(name)}$": min(module.weight.shape) - lora.r
                                     for name, module in targets.items()})
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)
