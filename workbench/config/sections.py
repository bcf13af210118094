"""The sections of a recipe (model, lora, data, train, wandb), each a pydantic schema whose every
field carries a one-line description: `workbench recipes --keys` prints them and docs/recipes.md's
tables are made from them (`config.keys`). `config.recipe` assembles them with the regularizers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workbench.config.self_distill import SelfDistill

# Positions per chunk of the fused loss head. Measured on a 128k head at 4,096 tokens: 512 takes
# 796 MB and 1.11x the head time of 1,024 (1,559 MB); 256 takes 414 MB and 1.23x (docs/benchmarks.md).
HEAD_CHUNK = 512


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyModel(Section):
    """The shape of a `tiny-random-<architecture>` model, built from a config: no download, trains
    in seconds."""

    hidden_size: int = Field(default=64, ge=8, description="Width of the residual stream.")
    num_hidden_layers: int = Field(default=2, ge=1, description="Decoder layers.")
    num_attention_heads: int = Field(default=4, ge=1, description="Query heads; hidden_size / heads is "
                                     "the head size.")
    num_key_value_heads: int = Field(default=2, ge=1, description="Key/value heads: grouped-query "
                                     "attention when fewer than the query heads.")
    intermediate_size: int = Field(default=128, ge=8, description="Width of the MLP's hidden layer.")


class ModelSection(Section):
    name: str = Field(default="smollm2-135m-instruct",
                      description="Hub id, local directory, a named model ('smollm2-135m-instruct', "
                      "'gemma3-270m': docs/model.md), or "
                      "'tiny-random-<architecture>' (llama, gemma2, gpt2, ...: docs/architectures.md).")
    revision: str | None = Field(default=None, description="Hub branch, tag or commit of a hub id; default the "
                                 "main branch. Ignored for a local directory.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="The dtype the weights load in; bfloat16 also turns on bf16 mixed "
        "precision (train.bf16), float16 fp16 (docs/precision.md).")
    trust_remote_code: bool = Field(default=False, description="Allow a model whose config needs its own Python "
                                    "code, which then runs on this machine; refused in one line otherwise.")
    load_in_4bit: bool = Field(default=False, description="QLoRA: quantise the frozen base to 4 bits through "
                               "bitsandbytes; the adapter stays fp32 (docs/precision.md).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="With load_in_4bit: the 4-bit "
                                                       "data type, bitsandbytes' NormalFloat4 or FP4.")
    bnb_4bit_use_double_quant: bool = Field(default=True, description="With load_in_4bit: quantise the "
                                            "quantisation constants too (about 0.4 bits a parameter saved).")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="With load_in_4bit: the dtype the 4-bit layers compute their matmuls in.")
    tiny: TinyModel = Field(default=TinyModel(), description="The shape of a tiny-random-<architecture> model; "
                            "ignored for any other name.")


LORA_INITS = ("default", "gaussian", "pissa", "olora", "corda_kpm", "corda_ipm", "eva", "mica", "orthogonal")
INITS_REWRITING_BASE = ("pissa", "olora", "corda_kpm", "corda_ipm")  # trained as rank 2r (modeling/lora_init.py)
INITS_NEEDING_DATA = ("corda_kpm", "corda_ipm", "eva")
TRAIN_DATA = "train"  # lora.init_data: the recipe's own training examples


class LoraSection(Section):
    enabled: bool = Field(default=True, description="Train a LoRA adapter; false fine-tunes every weight, and "
                          "the penalties, lora_dropout and the retention probe are refused.")
    method: Literal["lora", "osf"] = Field(default="lora", description="lora: B @ A added to each target. osf: PEFT's "
        "Orthogonal Subspace Fine-tuning: the r smallest singular directions of each target train, the rest frozen.")
    r: int = Field(default=16, ge=1, description="The rank of each adapter, B @ A with B [out, r], A [r, in].")
    alpha: float = Field(default=32.0, gt=0, description="The adapter's scale is alpha / r: the delta added to a "
                         "weight is (alpha / r) * B @ A.")
    target_modules: list[str] | Literal["all-linear", "attention", "mlp"] = Field(
        default="all-linear", description="Module names, or a preset: all-linear (every linear layer but the "
        "LM head), attention (those inside the attention blocks), mlp (those inside the MLP blocks).")
    layers: str | None = Field(default=None, pattern=r"^\d+-\d+$", description="Decoder layers to adapt, "
                               "'FIRST-LAST' counted from 0, both included (e.g. '12-29'); default every layer.")
    init: Literal[LORA_INITS] = Field(  # type: ignore[valid-type]
        default="default", description="How A and B start, through PEFT's own code (docs/regularizers.md); "
        "default: B = 0, so the tuned model starts as the base. pissa, olora and corda_* rewrite the base weights.")
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
    source: str = Field(default="builtin:pydoc", description="General data shuffled into the training set: a "
                        "file or builtin:NAME, as data.train.")
    ratio: float = Field(default=0.2, gt=0.0, lt=1.0, description="The replayed share of the training mix.")


class BaseReplay(Section):
    """Context-free replay: `ratio` of every batch is text the base sampled from BOS (or `prefix`),
    generated once before the adapter exists and cached; the task loss on it approximates KL(base ||
    tuned) on the base's own distribution, with no general data. A regularizer, not `data.replay`:
    its pool comes from the base, and it is mixed a fixed count per batch, not shuffled in."""

    ratio: float = Field(default=0.25, gt=0.0, lt=1.0, description="round(ratio * train.batch_size) "
                         "examples of every batch (on every rank), between 1 and batch_size - 1.")
    num_samples: int = Field(default=256, ge=1, description="The pool, cycled through in a seeded order.")
    max_new_tokens: int = Field(default=128, ge=1, description="Tokens a sample is generated up to.")
    temperature: float = Field(default=1.0, gt=0.0, description="1 with top_p 1: the base's distribution; "
                               "lower concentrates the samples on its modes.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling: the smallest set of tokens "
                         "holding this much probability; 1 keeps every token.")
    prefix: str = Field(default="", description="Text after BOS that every sample starts from.")
    seed: int = Field(default=0, description="The samples' seed, apart from train.seed: seeds share a pool.")


class DataSection(Section):
    train: str = Field(description="JSONL, JSON, CSV or Parquet file, a save_to_disk dir, builtin:NAME or "
                       "bigbench:TASK[:SPLIT]; a relative path is taken from the working directory.")
    val: str | None = Field(default=None, description="Validation data, as train; default: val_fraction of train.")
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="Without val: the share of train held "
                                "out (a seeded split) for validation; 0 holds none out.")
    format: Literal["auto", "messages", "prompt_completion"] = Field(
        default="auto", description="Record layout: messages (a chat, through the chat template) or prompt + "
        "completion; auto reads each record's keys.")
    max_length: int = Field(default=512, ge=8, description="Tokens per example; longer ones are cut, keeping "
                            "the start, and counted in run.json.")
    max_examples: int | None = Field(default=None, ge=1, description="Caps the training examples (after the "
                                     "validation split); default all.")
    max_val_examples: int | None = Field(default=None, ge=1, description="Caps the validation set.")
    replay: ReplaySection | None = Field(default=None, description="General text mixed into the training set at "
                                         "a ratio; default none.")
    self_distill: SelfDistill | None = Field(default=None, description="The base rewrites each training "
                                             "completion in its own words before training (docs/regularizers.md).")


class GeneralText(Section):
    """Retention on general text: perplexity, KL(base || tuned) and top-1 agreement per token."""

    source: str = Field(default="builtin:pydoc_heldout", description="The general text, a file or builtin:NAME; "
                        "the default is the fifth of Python's doc topics that builtin:pydoc leaves out.")
    num_chunks: int = Field(default=32, ge=2, description="Chunks of text scored (non-overlapping cuts, in a "
                            "seeded order).")
    chunk_length: int = Field(default=256, ge=8, description="Tokens per chunk.")
    top_k: int = Field(default=256, ge=1, description="Base log-probs cached per token for KL.")
    seed: int = Field(default=0, description="The seed of the chunks' order, so which chunks are scored.")

    def general(self) -> "GeneralText":
        """These settings alone: what the base side's cache entry is keyed by."""
        return GeneralText(**self.model_dump(include=set(GeneralText.model_fields)))


class RetentionProbe(GeneralText):
    """`workbench eval`'s general-text retention, measured while training on a few held-out chunks:
    logged as retention_ppl_ratio, retention_kl, retention_kl_upper, retention_top1_agreement and
    retention_ppl (docs/budgets.md)."""

    num_chunks: int = Field(default=4, ge=2, description="Chunks of text scored at each probe.")
    every: int = Field(default=10, ge=1, description="Steps between probes; the last step and, under "
                       "train.select, every checkpoint are probed too.")
    train_kl: bool = Field(default=True, description="Also log retention_train_kl: KL(base || tuned) per "
                           "completion token of the training batch, at every logged step.")


class Select(Section):
    """Which checkpoint becomes the run's adapter: the best by `metric` (lower is better) among the
    checkpoints whose probe meets every bound in `subject_to`, each an upper bound on a logged value."""

    metric: Literal["eval_loss", "retention_ppl_ratio", "retention_kl", "retention_kl_upper"] = Field(
        default="eval_loss", description="What the best checkpoint minimises; eval_loss needs validation data.")
    subject_to: dict[Literal["retention_ppl_ratio", "retention_kl", "retention_kl_upper", "eval_loss"],
                     float] = Field(default={}, description="Upper bounds, e.g. {retention_ppl_ratio: 1.05}.")

    @model_validator(mode="after")
    def _positive(self) -> "Select":
        bad = [f"{k}: {v}" for k, v in self.subject_to.items() if not v > 0]
        if bad:
            raise ValueError(f"select.subject_to bounds must be positive: {', '.join(bad)}")
        return self


class EarlyStopping(Section):
    patience: int = Field(default=3, ge=1, description="Evaluations without improvement.")
    min_delta: float = Field(default=0.0, ge=0.0, description="The least fall of validation loss that counts "
                             "as an improvement.")


class TrainSection(Section):
    output_dir: str | None = Field(default=None, description="Defaults to runs/<recipe name>.")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training set; a fraction stops part-way.")
    max_steps: int | None = Field(default=None, ge=1, description="Optimiser steps; overrides `epochs` when set.")
    batch_size: int = Field(default=8, ge=1, description="Examples per device per forward pass.")
    grad_accum: int = Field(default=1, ge=1, description="Forward passes summed into one optimiser step; the "
                            "losses are normalised over the whole accumulated batch.")
    learning_rate: float = Field(default=2e-4, gt=0, description="The peak learning rate, after warmup.")
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
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = Field(
        default="linear", description="The learning rate's schedule after warmup (HF's lr_scheduler_type).")
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="The share of all steps over which "
                                "the learning rate rises linearly from 0.")
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="Gradient clipping; 0 disables.")
    bf16: bool = Field(default=False, description="bf16 mixed precision: the forward and backward under "
                       "bf16 autocast, weights, optimiser and every penalty in fp32 (docs/precision.md). "
                       "model.dtype: bfloat16 turns it on too.")
    seed: int = Field(default=0, description="Seeds the validation split and the Trainer: data order, the "
                      "adapter's init, dropout.")
    logging_steps: int = Field(default=1, ge=1, description="Steps between logged records of every term.")
    eval_steps: int | None = Field(default=None, ge=1, description="Steps between validations; default once "
                                   "per epoch.")
    save_steps: int | None = Field(default=None, ge=1, description="Steps between checkpoints (the last two "
                                   "kept, all under select); default eval_steps under early_stopping, else an epoch.")
    early_stopping: EarlyStopping | None = Field(default=None, description="Stop when validation loss stops "
                                                 "improving and restore the best checkpoint; default off.")
    loss_head: Literal["fused", "full"] = Field(
        default="fused", description="fused: the model's forward stops at its final hidden states and the loss "
        "engine applies the LM head, the task loss and every per-token penalty a chunk of completion positions "
        "at a time, so no [batch, seq, vocab] logits or gradient exist. full: the engine runs over the model's "
        "own logits; used anyway, with a line saying why, under FSDP or DeepSpeed and for models whose "
        "post-head steps the workbench does not reproduce or that have no separate head.")
    head_chunk_size: int = Field(default=HEAD_CHUNK, ge=1, description="Positions per chunk of the loss "
                                 "engine: about five [chunk, vocab] fp32 tensors at a time (docs/benchmarks.md).")
    example_weights: Literal["none", "flow"] = Field(default="none", description="flow: each example's task loss "
        "times exp(-L / tau), L the base's mean loss per completion token on it, mean 1 (docs/regularizers.md).")
    flow_temperature: float | None = Field(default=None, gt=0.0, description="tau of flow; default the median L.")
    retention_probe: RetentionProbe | None = Field(default=None, description="General-text retention measured "
                                                   "during training (docs/budgets.md); default off.")
    select: Select | None = Field(default=None, description="Keep every checkpoint and write the best one "
                                  "within the budget to adapter/, not the last (needs retention_probe).")

    @model_validator(mode="after")
    def _selection(self) -> "TrainSection":
        if self.select is not None and self.retention_probe is None:
            raise ValueError("train.select needs train.retention_probe: the budget is on what the probe measures")
        if self.select is not None and self.early_stopping is not None:
            raise ValueError("train.select and train.early_stopping both choose the adapter: give one")
        if self.flow_temperature is not None and self.example_weights != "flow":
            raise ValueError(f"train.flow_temperature is for example_weights flow, not {self.example_weights}")
        return self


class WandbSection(Section):
    """Weights & Biases tracking; on when this section is present or with `--wandb`.

    The run name defaults to the recipe name plus a short hash of the resolved recipe, the group
    to the recipe family; `mode: auto` is online with an API key and offline without one.
    """

    project: str = Field(default="workbench", description="The W&B project runs are logged to.")
    entity: str | None = Field(default=None, description="The W&B team or user; default the API key's own.")
    group: str | None = Field(default=None, description="Default: the recipe family.")
    name: str | None = Field(default=None, description="Default: <recipe name>-<hash>.")
    tags: list[str] = Field(default=[], description="Tags added to the run.")
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        default="auto", description="auto: online with an API key, offline without one; disabled logs nothing.")
