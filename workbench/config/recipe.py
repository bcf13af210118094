"""The recipe: one validated description of a fine-tune.

A recipe is YAML. `extends: other.yaml` inherits from another recipe (paths relative to the file),
and `key.path=value` overrides from the command line are merged last. Every key is checked by a
pydantic schema that forbids unknown keys; mistakes come back as one line with a suggestion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from workbench.config.yamlfile import describe_error as describe_yaml_error
from workbench.config.yamlfile import read_yaml
from workbench.errors import UsageError
from workbench.config.penalties import PENALTY_CONFIGS, PenaltyConfig
from workbench.config.self_distill import SelfDistill

# Positions per chunk of the fused loss head. Measured on a 128k head at 4,096 tokens: 512 takes
# 796 MB and 1.11x the head time of 1,024 (1,559 MB); 256 takes 414 MB and 1.23x (docs/benchmarks.md).
HEAD_CHUNK = 512


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyModel(Section):
    """The shape of a `tiny-random-<architecture>` model, built from a config: no download, trains
    in seconds."""

    hidden_size: int = Field(default=64, ge=8)
    num_hidden_layers: int = Field(default=2, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    num_key_value_heads: int = Field(default=2, ge=1)
    intermediate_size: int = Field(default=128, ge=8)


class ModelSection(Section):
    name: str = Field(default="smollm2-135m-instruct",
                      description="Hub id, local directory, a named model ('smollm2-135m-instruct', "
                      "'gemma3-270m': docs/model.md), or "
                      "'tiny-random-<architecture>' (llama, gemma2, gpt2, ...: docs/architectures.md).")
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    load_in_4bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    tiny: TinyModel = TinyModel()


LORA_INITS = ("default", "gaussian", "pissa", "olora", "corda_kpm", "corda_ipm", "eva", "mica", "orthogonal")
INITS_REWRITING_BASE = ("pissa", "olora", "corda_kpm", "corda_ipm")  # trained as rank 2r (modeling/lora_init.py)
INITS_NEEDING_DATA = ("corda_kpm", "corda_ipm", "eva")
TRAIN_DATA = "train"  # lora.init_data: the recipe's own training examples


class LoraSection(Section):
    enabled: bool = True
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    target_modules: list[str] | Literal["all-linear", "attention", "mlp"] = Field(
        default="all-linear", description="Module names, or a preset: all-linear (every linear layer but the "
        "LM head), attention (those inside the attention blocks), mlp (those inside the MLP blocks).")
    layers: str | None = Field(default=None, pattern=r"^\d+-\d+$", description="Decoder layers to adapt, "
                               "'FIRST-LAST' counted from 0, both included (e.g. '12-29'); default every layer.")
    init: Literal[LORA_INITS] = Field(  # type: ignore[valid-type]
        default="default", description="How A and B start, through PEFT's own code (docs/regularizers.md): "
        "default (B = 0), gaussian, pissa, olora, corda_kpm, corda_ipm, eva, mica, orthogonal.")
    init_data: str | None = Field(default=None, description="Data the corda_* and eva inits compute from: "
                                  f"a text source, or '{TRAIN_DATA}' for the training examples. Default: the "
                                  "EWC reference (else builtin:pydoc) for corda_kpm, the training examples else.")
    init_examples: int = Field(default=64, ge=1, description="Examples the data-driven inits run on.")
    init_max_length: int = Field(default=256, ge=8, description="Tokens per example of a text init_data.")

    @model_validator(mode="after")
    def _layer_range(self) -> "LoraSection":
        if self.layers is not None:
            first, last = map(int, self.layers.split("-"))
            if first > last:
                raise ValueError(f"lora.layers {self.layers}: the first layer is after the last")
        return self

    def layer_indices(self) -> list[int] | None:
        if self.layers is None:
            return None
        first, last = map(int, self.layers.split("-"))
        return list(range(first, last + 1))


class ReplaySection(Section):
    source: str = Field(default="builtin:pydoc", description="General data mixed into training.")
    ratio: float = Field(default=0.2, gt=0.0, lt=1.0, description="Fraction of the training mix.")


class BaseReplay(Section):
    """Context-free replay: `ratio` of every batch is text the base sampled from BOS (or `prefix`),
    generated once before the adapter exists and cached; the task loss on it approximates KL(base ||
    tuned) on the base's own distribution, with no general data. A regularizer, not `data.replay`:
    its pool comes from the base, and it is mixed a fixed count per batch, not shuffled in."""

    ratio: float = Field(default=0.25, gt=0.0, lt=1.0, description="round(ratio * train.batch_size) "
                         "examples of every batch (on every rank), between 1 and batch_size - 1")
    num_samples: int = Field(default=256, ge=1, description="the pool, cycled through in a seeded order")
    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=1.0, gt=0.0, description="1 with top_p 1: the base's distribution")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    prefix: str = Field(default="", description="text after BOS that every sample starts from")
    seed: int = Field(default=0, description="the samples' seed, apart from train.seed: seeds share a pool")


class DataSection(Section):
    train: str = Field(description="JSONL/CSV/Parquet file, a save_to_disk dir, or builtin:NAME.")
    val: str | None = None
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    format: Literal["auto", "messages", "prompt_completion"] = "auto"
    max_length: int = Field(default=512, ge=8)
    max_examples: int | None = Field(default=None, ge=1)
    max_val_examples: int | None = Field(default=None, ge=1, description="Caps the validation set.")
    replay: ReplaySection | None = None
    self_distill: SelfDistill | None = Field(default=None, description="The base rewrites each training "
                                             "completion in its own words before training (docs/regularizers.md).")


class GeneralText(Section):
    """Retention on general text: perplexity, KL(base || tuned) and top-1 agreement per token."""

    source: str = "builtin:pydoc_heldout"
    num_chunks: int = Field(default=32, ge=2)
    chunk_length: int = Field(default=256, ge=8)
    top_k: int = Field(default=256, ge=1, description="base log-probs cached per token for KL")
    seed: int = 0

    def general(self) -> "GeneralText":
        """These settings alone: what the base side's cache entry is keyed by."""
        return GeneralText(**self.model_dump(include=set(GeneralText.model_fields)))


class RetentionProbe(GeneralText):
    """`workbench eval`'s general-text retention, measured while training on a few held-out chunks:
    logged as retention_ppl_ratio, retention_kl, retention_kl_upper, retention_top1_agreement and
    retention_ppl (docs/budgets.md)."""

    num_chunks: int = Field(default=4, ge=2)
    every: int = Field(default=10, ge=1, description="steps between probes; the last step and, under "
                       "train.select, every checkpoint are probed too")
    train_kl: bool = Field(default=True, description="also log retention_train_kl: KL(base || tuned) per "
                           "completion token of the training batch, at every logged step")


class Select(Section):
    """Which checkpoint becomes the run's adapter: the best by `metric` (lower is better) among the
    checkpoints whose probe meets every bound in `subject_to`, each an upper bound on a logged value."""

    metric: Literal["eval_loss", "retention_ppl_ratio", "retention_kl", "retention_kl_upper"] = "eval_loss"
    subject_to: dict[Literal["retention_ppl_ratio", "retention_kl", "retention_kl_upper", "eval_loss"],
                     float] = Field(default={}, description="upper bounds, e.g. {retention_ppl_ratio: 1.05}")

    @model_validator(mode="after")
    def _positive(self) -> "Select":
        bad = [f"{k}: {v}" for k, v in self.subject_to.items() if not v > 0]
        if bad:
            raise ValueError(f"select.subject_to bounds must be positive: {', '.join(bad)}")
        return self


class EarlyStopping(Section):
    patience: int = Field(default=3, ge=1, description="Evaluations without improvement.")
    min_delta: float = Field(default=0.0, ge=0.0)


class TrainSection(Section):
    output_dir: str | None = Field(default=None, description="Defaults to runs/<recipe name>.")
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="Overrides `epochs` when set.")
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    optimizer: Literal["adamw", "sgd"] = Field(
        default="adamw", description="adamw: the Trainer's default AdamW. sgd: plain torch.optim.SGD, no "
        "momentum (weight_decay is then an L2 term in the gradient); it keeps no state and is linear in "
        "the gradient, so runs that sum the same gradient in another order (accumulation, data "
        "parallelism) agree to float rounding, where Adam's normalised step amplifies that rounding. "
        "The equivalence tests use it.")
    loss: Literal["nll", "dft"] = Field(
        default="nll", description="The task loss. nll: cross-entropy on completion tokens. dft: dynamic "
        "fine-tuning, each token's NLL weighted by its detached probability; with regularizers.kl_to_base "
        "it is anchored SFT (docs/regularizers.md). Validation loss is NLL either way.")
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="Gradient clipping; 0 disables.")
    bf16: bool = Field(default=False, description="bf16 mixed precision: the forward and backward under "
                       "bf16 autocast, weights, optimiser and every penalty in fp32 (docs/precision.md). "
                       "model.dtype: bfloat16 turns it on too.")
    seed: int = 0
    logging_steps: int = Field(default=1, ge=1)
    eval_steps: int | None = Field(default=None, ge=1, description="Default: once per epoch.")
    save_steps: int | None = Field(default=None, ge=1)
    early_stopping: EarlyStopping | None = None
    loss_head: Literal["fused", "full"] = Field(
        default="fused", description="fused: the model's forward stops at its final hidden states and the LM "
        "head, the task loss and every per-token penalty run a chunk of completion positions at a time, so no "
        "[batch, seq, vocab] logits or gradient exist (kl_to_base.chunk_size is then unused). full: the "
        "model's whole logits, as plain HF training; used anyway, with a line saying why, under FSDP or "
        "DeepSpeed and for models that rescale their logits or have no separate head.")
    head_chunk_size: int = Field(default=HEAD_CHUNK, ge=1, description="Positions per chunk of the fused "
                                 "head: about five [chunk, vocab] fp32 tensors at a time (docs/benchmarks.md).")
    retention_probe: RetentionProbe | None = None
    select: Select | None = Field(default=None, description="keep every checkpoint and write the best one "
                                  "within the budget to adapter/, not the last (needs retention_probe)")

    @model_validator(mode="after")
    def _selection(self) -> "TrainSection":
        if self.select is not None and self.retention_probe is None:
            raise ValueError("train.select needs train.retention_probe: the budget is on what the probe measures")
        if self.select is not None and self.early_stopping is not None:
            raise ValueError("train.select and train.early_stopping both choose the adapter: give one")
        return self


def _regularizers_schema() -> type[Section]:
    """Knobs that act through the optimiser or the model, plus one field per registered penalty."""
    penalties: dict[str, Any] = {name: (config | None, None) for name, config in PENALTY_CONFIGS.items()}
    return create_model(
        "Regularizers",
        __base__=Section,
        weight_decay=(float, Field(default=0.0, ge=0.0, description="Decoupled under adamw; an L2 term in the "
                                   "gradient under train.optimizer: sgd.")),
        lora_dropout=(float, Field(default=0.0, ge=0.0, lt=1.0)),
        label_smoothing=(float, Field(default=0.0, ge=0.0, lt=1.0)),
        neftune_alpha=(float | None, Field(default=None, gt=0.0)),
        base_replay=(BaseReplay | None, None),
        **penalties,
    )


Regularizers = _regularizers_schema()


class WandbSection(Section):
    """Weights & Biases tracking; on when this section is present or with `--wandb`.

    The run name defaults to the recipe name plus a short hash of the resolved recipe, the group
    to the recipe family; `mode: auto` is online with an API key and offline without one.
    """

    project: str = "workbench"
    entity: str | None = None
    group: str | None = Field(default=None, description="Default: the recipe family.")
    name: str | None = Field(default=None, description="Default: <recipe name>-<hash>.")
    tags: list[str] = []
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


class Recipe(Section):
    name: str = "recipe"
    description: str = ""
    family: str | None = Field(
        default=None, description="The family `workbench compare` pools this recipe's points into; default "
        "its name. A free way to train less (a lower learning rate) names the baseline's family here.")
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    regularizers: Regularizers = Regularizers()  # type: ignore[valid-type]
    wandb: WandbSection | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        needs_lora = [n for n, cfg in self.penalties().items()] + (
            ["lora_dropout"] if self.regularizers.lora_dropout else [])
        if needs_lora and not self.lora.enabled:
            raise ValueError(f"regularizers {', '.join(needs_lora)} act on the LoRA adapter, "
                             "but lora.enabled is false")
        if self.train.retention_probe is not None and not self.lora.enabled:
            raise ValueError("train.retention_probe measures the tuned model against the base as the adapter "
                             "switched off, but lora.enabled is false")
        if self.train.loss == "dft" and self.regularizers.label_smoothing:
            raise ValueError("train.loss dft with regularizers.label_smoothing: DFT weights the one observed "
                             "token by its probability, and smoothing's uniform target has no observed token "
                             "to weight; use one of them")
        if self.lora.init in INITS_REWRITING_BASE:
            clash = [f"{name} {value}" for name, value in (
                ("regularizers.weight_decay", self.regularizers.weight_decay),
                ("regularizers.lora_dropout", self.regularizers.lora_dropout),
                ("model.load_in_4bit", self.model.load_in_4bit)) if value]
            if clash:
                raise ValueError(f"lora.init {self.lora.init} with {', '.join(clash)}: the adapter holds a "
                                 "frozen copy of the base's components that weight decay would shrink, "
                                 "dropout would drop and a 4-bit base cannot be restored under")
        if self.data.self_distill is not None and self.data.format == "messages":
            raise ValueError("data.self_distill rewrites each record's completion, and data.format messages has "
                             "none: give prompt/completion records")
        replay, batch = self.regularizers.base_replay, self.train.batch_size
        if replay is not None and not 0 < round(replay.ratio * batch) < batch:
            raise ValueError(f"regularizers.base_replay.ratio {replay.ratio}: round({replay.ratio} * train.batch_size "
                             f"{batch}) = {round(replay.ratio * batch)} a batch leaves no room for replay or task")
        ewc = self.regularizers.ewc
        if ewc is not None and ewc.weight > 0 and not (ewc.fisher or ewc.reference):
            raise ValueError("regularizers.ewc needs a Fisher: set ewc.fisher (a file from "
                             "`workbench fisher`) or ewc.reference (data to estimate it on)")
        return self

    def penalties(self) -> dict[str, PenaltyConfig]:
        """The loss-side regularizers that are switched on (present with weight > 0)."""
        configs = {name: getattr(self.regularizers, name) for name in PENALTY_CONFIGS}
        return {name: cfg for name, cfg in configs.items() if cfg is not None and cfg.weight > 0}

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or f"runs/{self.name}")


# ---------------------------------------------------------------- loading


def _merge(base: dict, update: dict) -> dict:
    """Deep merge: mappings merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The recipe mapping with `extends:` chains resolved (parents first)."""
    path = Path(path).resolve()
    if path in _seen:
        raise UsageError(f"{path}: `extends` cycle through {' -> '.join(p.name for p in _seen)}")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UsageError(f"{path}: `extends` must be a path to another recipe")
    return _merge(load_raw(path.parent / parent, _seen + (path,)), data)


def parse_override(text: str) -> dict:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}, the value parsed as YAML (so 0.1 is a float)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"override {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UsageError(f"override {text!r}: value is not valid YAML") from exc
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, inherit, override and validate a recipe, or raise UsageError naming the key."""
    data = load_raw(path)
    data.setdefault("name", Path(path).stem)
    for text in overrides:
        data = _merge(data, parse_override(text))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{path}: {describe_error(exc)}") from None
    _check_relative_data(Path(path), recipe)
    return recipe


def _check_relative_data(path: Path, recipe: Recipe) -> None:
    """Relative data paths are taken from the working directory, as on the command line (an
    override `data.train=x.jsonl` means ./x.jsonl), while `extends:` is taken from the recipe's
    own directory. A data file that exists only next to the recipe is the likely slip: say so."""
    for key, source in (("data.train", recipe.data.train), ("data.val", recipe.data.val)):
        if not source or source.startswith(("builtin:", "bigbench:")) or Path(source).is_absolute():
            continue
        beside = path.parent / source
        if not Path(source).exists() and beside.exists():
            raise UsageError(f"{path}: {key}: {source} is not in the working directory ({Path.cwd()}), which "
                             f"relative data paths are taken from; the recipe's directory has it: give {beside}")


def describe_error(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """`yamlfile.describe_error` against the recipe schema unless another model is given."""
    return describe_yaml_error(exc, model or Recipe)


def resolved(recipe: Recipe) -> dict:
    """The recipe as plain data, every default filled in (what run.json records)."""
    return recipe.model_dump(mode="json")
