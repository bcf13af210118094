"""LoRA initialisations through PEFT's own code, with the base kept the base.

PEFT offers inits that claim to keep more of the base or to learn faster. Three kinds:

- `default` (B = 0, A Kaiming-uniform), `gaussian` (B = 0, A Gaussian), `eva` (B = 0, A from the
  SVD of the layer inputs on data), `orthogonal` (B A = 0 by orthogonal row blocks), `mica` (A = 0,
  B the minor left singular vectors of W, frozen): the adapter starts as a no-op on the base.
- `pissa`, `olora`, `corda_kpm`, `corda_ipm`: A0 and B0 hold part of W (its principal singular
  components, a QR factor, or components chosen by a data covariance), and PEFT subtracts that part
  from the base, W_res = W - s B0 A0. Then "the adapter disabled" is W_res, not the base: KL-to-base
  would anchor to the wrong model, EWC and the delta L2 would penalise the change from W_res, and an
  eval that loads the adapter on the real base would add B0 A0 twice.

For the second kind the base is restored and the adapter made rank 2r: A = [A0; A0], B = [B0, -B0]
with the second half frozen (its gradient is zeroed by a hook, so neither optimiser moves it).
Before training s B A = s (B0 A0 - B0 A0) = 0 and the model is the base; the first half trains
exactly as under PEFT (same factors, same gradients); `disable_adapter()` is the base, and
dW = s (B1 A1 - B0 A0) is the change from the base, which EWC and the delta L2 see through
`lora_factors` unchanged. The adapter saved is a plain rank-2r LoRA (alpha doubled so the scale
alpha / r is the same) that loads in plain PEFT on the original base. PEFT's own answer, converting
at save time (`path_initial_model_for_weight_conversion`), gives the same file but leaves training
anchored to W_res. The frozen half is why weight decay (it would shrink the frozen half) and LoRA
dropout (it would drop the frozen half's inputs) are refused with these inits (config.recipe).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import EvaConfig, LoraLayer
from peft.tuners.lora.config import CordaConfig
from safetensors.torch import load_file, save_file

from workbench.config.recipe import INITS_NEEDING_DATA as NEEDS_DATA
from workbench.config.recipe import INITS_REWRITING_BASE as REWRITES_BASE
from workbench.errors import UsageError
from workbench.io import atomic_path

PEFT_NAME = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "corda_kpm": "corda",
             "corda_ipm": "corda", "eva": "eva", "mica": "mica", "orthogonal": "orthogonal"}

Batches = Callable[[], Iterable[dict]]  # model-input batches (input_ids, attention_mask, labels)


def initialised_lora(model: torch.nn.Module, config: LoraConfig, init: str, batches: Batches | None = None,
                     cache: Path | None = None) -> PeftModel:
    """`model` wrapped in LoRA `config` initialised by `init` (a key of PEFT_NAME); data-driven inits
    run the model on `batches()` and keep what they computed in `cache` (a file, reused when there)."""
    if init in NEEDS_DATA and batches is None:
        raise UsageError(f"lora.init {init} computes its factors from data: give lora.init_data")
    config.init_lora_weights = PEFT_NAME[init]
    originals = _targeted_weights(model, config) if init in REWRITES_BASE else None
    try:
        if init.startswith("corda"):
            _corda(model, config, init.removeprefix("corda_"), batches, cache)
        if init == "eva":
            config.eva_config = EvaConfig()
            peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
            _eva(peft_model, batches, cache)
        else:
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # PEFT's own checks: an odd rank for orthogonal, r above a layer's size for mica
        raise UsageError(f"lora.init {init}: {exc}".replace("\n", " ")) from None
    if originals is None:
        return peft_model
    return _keep_the_base(peft_model, config, originals)


def _targeted_weights(model: torch.nn.Module, config: LoraConfig) -> dict[str, torch.Tensor]:
    """A copy of every weight the config targets, to restore exactly (a bf16 W_res + s B0 A0
    would not round back to W)."""
    plain = copy.deepcopy(config)
    plain.init_lora_weights, plain.corda_config = True, None
    probe = get_peft_model(model, plain)
    names = [n for n, m in probe.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    probe.unload()
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().clone() for n in names}


def _keep_the_base(peft_model: PeftModel, config: LoraConfig, originals: dict[str, torch.Tensor]) -> PeftModel:
    """Rank 2r on the restored base: A = [A0; A0], B = [B0, -B0], the second half frozen."""
    initial = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            initial[name] = (module.lora_A["default"].weight.detach().clone(),
                             module.lora_B["default"].weight.detach().clone())
    model = peft_model.unload()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in originals.items():
            modules[name].weight.copy_(weight)
    doubled = copy.deepcopy(config)
    doubled.init_lora_weights, doubled.corda_config = True, None
    doubled.r, doubled.lora_alpha = 2 * config.r, 2 * config.lora_alpha
    peft_model = get_peft_model(model, doubled)
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            A0, B0 = initial[name]
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            with torch.no_grad():
                A.copy_(torch.cat([A0, A0]))
                B.copy_(torch.cat([B0, -B0], dim=1))
            r = A0.shape[0]
            A.register_hook(_zero_from(r, dim=0))
            B.register_hook(_zero_from(r, dim=1))
    return peft_model


def _zero_from(r: int, dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook that keeps the first r rows (dim 0) or columns (dim 1) and zeroes the rest."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.narrow(dim, r, grad.shape[dim] - r).zero_()
        return grad
    return hook


def _run(model: torch.nn.Module, batches: Batches) -> None:
    """One example per forward, padding dropped: PEFT's covariance hook sums over the positions of
    a batch of one."""
    with torch.no_grad():
        for batch in batches():
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                model(input_ids=ids[mask.bool()][None])


def _corda(model: torch.nn.Module, config: LoraConfig, method: str, batches: Batches, cache: Path | None) -> None:
    """PEFT's CorDA preprocessing: the covariance of each targeted layer's inputs on the data (kept
    in `cache`), then the decomposition that `get_peft_model` reads from the layers."""
    from peft.tuners.lora.corda import preprocess_corda

    config.corda_config = CordaConfig(corda_method=method, verbose=False)
    if cache is not None and cache.is_file():
        try:
            config.corda_config.covariance_file = str(cache)
            preprocess_corda(model, config, run_model=lambda: _run(model, batches))
            return
        except Exception as exc:  # a damaged cache entry is computed again
            print(f"lora init: {cache}: {type(exc).__name__}; computing the covariance again")
    if cache is None:
        preprocess_corda(model, config, run_model=lambda: _run(model, batches))
        return
    with atomic_path(cache) as tmp:  # PEFT writes the covariance to an empty file it is given
        config.corda_config.covariance_file = str(tmp)
        preprocess_corda(model, config, run_model=lambda: _run(model, batches))
    config.corda_config.covariance_file = None


def _eva(peft_model: PeftModel, batches: Batches, cache: Path | None) -> None:
    """PEFT's EVA: A from the incremental SVD of each targeted layer's inputs (kept in `cache`)."""
    from peft import get_eva_state_dict, initialize_lora_eva_weights

    state = None
    if cache is not None and cache.is_file():
        try:
            state = load_file(cache)
        except Exception as exc:
            print(f"lora init: {cache}: {type(exc).__name__}; computing EVA again")
    if state is None:
        state = get_eva_state_dict(peft_model, list(batches()), show_progress_bar=False)
        if cache is not None:
            with atomic_path(cache) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    initialize_lora_eva_weights(peft_model, eva_state_dict=state, show_progress_bar=False)
