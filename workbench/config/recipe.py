"""The recipe: one validated description of a fine-tune.

A recipe is YAML. `extends: other.yaml` inherits from another recipe (paths relative to the file),
and `key.path=value` overrides from the command line are merged last. Every key is checked by a
pydantic schema that forbids unknown keys; mistakes come back as one line with a suggestion. The
sections are in `config.sections`; here they are assembled with the regularizers and loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from workbench.config.yamlfile import describe_error as describe_yaml_error
from workbench.config.yamlfile import read_yaml
from workbench.errors import UsageError
from workbench.config.adapters import osf_clashes
from workbench.config.penalties import PENALTY_CONFIGS, PenaltyConfig
from workbench.config.sections import (  # noqa: F401 (the sections are imported from here too)
    HEAD_CHUNK, INITS_NEEDING_DATA, INITS_REWRITING_BASE, LORA_INITS, TRAIN_DATA, BaseReplay, DataSection,
    EarlyStopping, GeneralText, LoraSection, ModelSection, ReplaySection, RetentionProbe, Section, Select,
    TinyModel, TrainSection, WandbSection,
)


def _regularizers_schema() -> type[Section]:
    """Knobs that act through the optimiser or the model, plus one field per registered penalty,
    described by its config's docstring."""
    penalties: dict[str, Any] = {name: (config | None, Field(default=None, description=" ".join(
        (config.__doc__ or "").split()) or None)) for name, config in PENALTY_CONFIGS.items()}
    return create_model(
        "Regularizers",
        __base__=Section,
        weight_decay=(float, Field(default=0.0, ge=0.0, description="Decoupled under adamw, on weight matrices "
                                   "only (never biases or norms); an L2 term in the gradient under "
                                   "train.optimizer: sgd.")),
        lora_dropout=(float, Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch's input "
                                   "(PEFT's lora_dropout); refused with the inits that rewrite the base.")),
        label_smoothing=(float, Field(default=0.0, ge=0.0, lt=1.0, description="Mass of the task loss's target "
                                      "spread uniformly over the vocabulary; validation loss stays NLL. Refused "
                                      "with train.loss: dft.")),
        neftune_alpha=(float | None, Field(default=None, gt=0.0, description="NEFTune: uniform noise of scale "
                                           "alpha / sqrt(seq_len * hidden) on the input embeddings while training.")),
        base_replay=(BaseReplay | None, Field(default=None, description="A fixed share of every batch is text the "
                                              "base sampled from BOS, trained with the task loss; default off.")),
        **penalties,
    )


Regularizers = _regularizers_schema()


class Recipe(Section):
    name: str = Field(default="recipe", description="Names the run (runs/<name>) and the W&B run; default the "
                      "recipe file's stem.")
    description: str = Field(default="", description="Free text, recorded in run.json.")
    family: str | None = Field(
        default=None, description="The family `workbench compare` pools this recipe's points into; default "
        "its name. A free way to train less (a lower learning rate) names the baseline's family here.")
    model: ModelSection = Field(default=ModelSection(), description="The base model and how it loads.")
    lora: LoraSection = Field(default=LoraSection(), description="The adapter: rank, scale, where and how it "
                              "starts.")
    data: DataSection = Field(description="The training and validation data.")
    train: TrainSection = Field(default=TrainSection(), description="The optimisation, the loss, checkpoints and "
                                "what is measured while training.")
    regularizers: Regularizers = Field(  # type: ignore[valid-type]
        default=Regularizers(), description="What keeps the tuned model near its base: each off unless set.")
    wandb: WandbSection | None = Field(default=None, description="Weights & Biases tracking; off unless present "
                                       "or --wandb is given.")

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
        if self.lora.enabled and self.lora.method == "osf" and osf_clashes(self):
            raise ValueError(f"lora.method osf with {osf_clashes(self)}")
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
