"""Fisher information of the LoRA-targeted base weights, for EWC.

Estimated once on reference (general-domain) data with the adapter disabled, from per-example
gradients of each example's mean token NLL (squaring a batch-mean gradient instead is a known
bug: it shrinks the Fisher by the batch size). Two estimators, per targeted linear W [out, in]
with output gradients g [tokens, out] and inputs a [tokens, in]:

- `kfac_diag`: F_ij ~= G_i * A_j with G = E_examples[sum_t g_t**2], A = E_tokens[a**2], the
  K-FAC diagonal (token and input/gradient independence). Two vectors per module.
- `diag`: F_ij = E_examples[(sum_t g_ti a_tj)**2], the exact diagonal empirical Fisher.

Sums are accumulated with hooks and all-reduced across data-parallel ranks, so every rank holds
the same Fisher.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from workbench.errors import UsageError
from workbench.formats.integrity import check_sealed, seal, seal_metadata
from workbench.io import atomic_path
from workbench.distributed import my_share
from workbench.modeling.lora import as_base, lora_factors, unwrap_peft
from workbench.scoring.masks import IGNORE, shifted_labels

ESTIMATORS = ("kfac_diag", "diag")


class _Accumulator:
    """Hooks on one base linear layer; sums of the Fisher's factors over examples and tokens."""

    def __init__(self, layer: torch.nn.Module, out_f: int, in_f: int, estimator: str):
        """layer: the base layer (nn.Linear, a bitsandbytes Linear4bit whose packed weight has
        another shape, or GPT-2's Conv1D, which stores its weight [in, out]); hooks see inputs
        [B, T, in_f] and outputs [B, T, out_f] for all three."""
        self.estimator, self.inputs, self.token_mask = estimator, None, None
        if estimator == "diag":
            self.sums = {"diag": torch.zeros(out_f, in_f, dtype=torch.float64)}
        else:
            self.sums = {"g": torch.zeros(out_f, dtype=torch.float64),
                         "a": torch.zeros(in_f, dtype=torch.float64)}
        self.handle = layer.register_forward_hook(self._forward)

    def _forward(self, layer, args, output):
        # [B, T, in]; OPT's MLP runs on the tokens flattened to [B * T, in], in the same order
        self.inputs = args[0].detach().float().reshape(*self.token_mask.shape, -1)
        if self.estimator == "kfac_diag":
            a2 = self.inputs.pow(2) * self.token_mask[..., None]
            self.sums["a"] += a2.sum((0, 1)).double().cpu()
        output.register_hook(self._backward)

    def _backward(self, grad):  # grad: [B, T, out], per example since the loss sums examples
        grad = grad.float().reshape(*self.token_mask.shape, -1)
        if self.estimator == "diag":
            per_example = torch.einsum("bto,bti->boi", grad, self.inputs)
            self.sums["diag"] += per_example.pow(2).sum(0).double().cpu()
        else:
            self.sums["g"] += grad.pow(2).sum((0, 1)).double().cpu()


@contextlib.contextmanager
def _grad_from_embeddings(model):
    """Frozen weights: make the embedding output require grad so layer hooks see gradients."""
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda mod, args, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


def _per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over examples of each example's mean next-token NLL. logits [B, T, V], labels [B, T]."""
    targets = shifted_labels(labels)
    nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=IGNORE, reduction="none")  # [B, T]
    counts = (targets != IGNORE).sum(1).clamp(min=1)
    return (nll.sum(1) / counts).sum()


def estimate_fisher(model: torch.nn.Module, examples: list[dict], collate, estimator: str = "kfac_diag",
                    batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Fisher of every LoRA-targeted base weight of `model` (a PEFT model), keyed like
    `lora_factors`: '<module>.g'/'<module>.a' (kfac_diag) or '<module>.diag' (diag), fp32."""
    peft_model = unwrap_peft(model)
    modules = dict(peft_model.named_modules())
    accs = {f.key: _Accumulator(modules["base_model.model." + f.key].base_layer, f.B.shape[0], f.A.shape[1],
                                estimator) for f in lora_factors(peft_model)}
    device = next(peft_model.parameters()).device
    n_examples, n_tokens = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    mine = my_share(examples)
    try:
        with as_base(peft_model, grad=True), _grad_from_embeddings(peft_model):
            for start in tqdm(range(0, len(mine), batch_size), desc=f"fisher ({estimator})",
                              disable=not mine or _quiet()):
                batch = {k: v.to(device) for k, v in collate(mine[start:start + batch_size]).items()}
                mask = batch["attention_mask"].float()
                for acc in accs.values():
                    acc.token_mask = mask
                logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                _per_example_loss(logits, batch["labels"]).backward()
                n_examples += len(batch["input_ids"])
                n_tokens += mask.sum().double().cpu()
    finally:
        for acc in accs.values():
            acc.handle.remove()
    return _finish(accs, n_examples, n_tokens, device)


def _quiet() -> bool:
    """Only the main process draws progress bars."""
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _all_reduce(tensor: torch.Tensor, device: torch.device) -> None:
    """Sum across ranks in place; NCCL needs the tensor on the GPU, gloo takes it anywhere."""
    moved = tensor.to(device)
    dist.all_reduce(moved)
    tensor.copy_(moved)


def _finish(accs: dict, n_examples: torch.Tensor, n_tokens: torch.Tensor,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Turn sums into means (all-reduced across ranks first)."""
    sums = {f"{key}.{name}": value for key, acc in accs.items() for name, value in acc.sums.items()}
    counts = torch.stack([n_examples, n_tokens])
    if dist.is_available() and dist.is_initialized():
        for tensor in [*sums.values(), counts]:
            _all_reduce(tensor, device)
    n_examples, n_tokens = counts.tolist()
    if n_examples == 0:
        raise UsageError("Fisher estimation got no reference examples")
    return {name: (value / (n_tokens if name.endswith(".a") else n_examples)).float()
            for name, value in sums.items()}


def save_fisher(path: str | Path, fisher: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write the Fisher as safetensors with string metadata (fingerprints, estimator), atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in fisher.items()}, str(tmp),
                  metadata=seal_metadata({k: str(v) for k, v in metadata.items()}))
        seal(tmp)
    return Path(path)


def load_fisher(path: str | Path, model: torch.nn.Module, model_fingerprint: str | None = None):
    """Load a Fisher and check it belongs to `model`: same base fingerprint, same modules, shapes."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: Fisher file not found (create one with `workbench fisher`)")
    damaged = check_sealed(path)
    if damaged:
        raise UsageError(f"{path}: not a readable safetensors Fisher file ({damaged})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            fisher = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt header
        raise UsageError(f"{path}: not a readable safetensors Fisher file ({exc})") from None
    if model_fingerprint and metadata.get("model_fingerprint") not in (None, model_fingerprint):
        raise UsageError(f"{path}: Fisher was estimated on another base model (fingerprint "
                         f"{metadata.get('model_fingerprint')}, this model is {model_fingerprint})")
    check_fisher(fisher, model, path)
    return fisher, metadata


def check_fisher(fisher: dict[str, torch.Tensor], model: torch.nn.Module, where) -> None:
    """Every LoRA-targeted module has Fisher factors of the right shapes."""
    for f in lora_factors(model):
        out_f, in_f = f.B.shape[0], f.A.shape[1]
        expected = ({f"{f.key}.diag": (out_f, in_f)} if f"{f.key}.diag" in fisher
                    else {f"{f.key}.g": (out_f,), f"{f.key}.a": (in_f,)})
        for key, shape in expected.items():
            if key not in fisher:
                raise UsageError(f"{where}: no Fisher for LoRA module '{f.key}' (estimated with "
                                 "other target_modules?)")
            if tuple(fisher[key].shape) != shape:
                raise UsageError(f"{where}: Fisher '{key}' has shape {tuple(fisher[key].shape)}, "
                                 f"the model needs {shape}")
