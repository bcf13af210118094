"""One training run, from a validated recipe to `<output_dir>/run.json` and `<output_dir>/adapter/`."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import EarlyStoppingCallback, TrainerCallback, TrainingArguments, set_seed

from workbench.data.examples import (
    EXAMPLE_INDEX, Collator, build_datasets, data_fingerprint, general_text_examples
)
from workbench.distributed import init_distributed, is_main_process, world_size
from workbench.errors import Interrupted, RunFailed, UsageError
from workbench.training.faults import check_checkpoint, checkpoint_step, checkpoints, recorded
from workbench.training.rundir import check_base, previous_run, resume_point, start_over
from workbench.training.fisher import estimate_fisher, load_fisher, save_fisher
from workbench.io import cache_dir, fingerprint, writing
from workbench.modeling.load import (
    apply_lora, count_parameters, load_model, load_tokenizer, model_fingerprint, public_name
)
from workbench.config.recipe import INITS_NEEDING_DATA, INITS_REWRITING_BASE, TRAIN_DATA, Recipe, resolved
from workbench.formats.integrity import write_manifest
from workbench.formats.run_record import RunRecord, versions
from workbench.training.reference import topk_reference_for
from workbench.training.base_replay import pool_for, use_mixed_batches, with_base_replay
from workbench.training.example_weights import with_example_weights
from workbench.training.self_distill import self_distilled
from workbench.training.probe import RetentionProbeCallback, probe_chunks
from workbench.training.regularizers import PENALTIES
from workbench.training.select import choose, closest, copy_adapter
from workbench.modeling.lora import lora_factors
from workbench.training.trainer import RegularizedTrainer



def prepare(recipe: Recipe):
    """Tokenizer, data, base model and LoRA; data first so a bad file fails before a model loads."""
    init_distributed()
    set_seed(recipe.train.seed)
    tokenizer = load_tokenizer(recipe.model)
    data = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    model, tokenizer = load_model(recipe.model, tokenizer)
    base_fingerprint = model_fingerprint(model)
    replay = recipe.regularizers.base_replay
    if replay is not None:  # sampled before LoRA exists: the base, whatever the init does to its weights
        rows, record = pool_for(model, tokenizer, replay, base_fingerprint)
    if recipe.data.self_distill is not None:  # rewritten before LoRA exists, as base replay is sampled
        data = self_distilled(recipe, tokenizer, model, base_fingerprint)
    task_train = data.train  # what a data-driven init sees: the task examples only
    if replay is not None:
        data = with_base_replay(data, rows, record, tokenizer, replay, recipe.data.max_length,
                                recipe.train.batch_size)
    # the base's losses, before LoRA too; on the whole set the trainer draws from, replay included
    data = with_example_weights(data, model, recipe.train, base_fingerprint, tokenizer.pad_token_id)
    if recipe.lora.enabled:
        batches, cache = lora_init_data(recipe, tokenizer, task_train, base_fingerprint)
        model = apply_lora(model, recipe.lora, recipe.regularizers.lora_dropout, batches, cache)
        model.peft_config["default"].base_model_name_or_path = public_name(recipe.model.name)  # saved as given
    return tokenizer, data, model, base_fingerprint


def lora_init_data(recipe: Recipe, tokenizer, train: list[dict], base_fingerprint: str):
    """(batches, cache file) for an init computed from data (`lora.init_data`), else (None, None).
    The cache is keyed by the base, the adapter's shape and the examples' tokens, as the Fisher is."""
    lora, ewc = recipe.lora, recipe.regularizers.ewc
    if lora.init not in INITS_NEEDING_DATA:
        return None, None
    source = lora.init_data or (TRAIN_DATA if lora.init != "corda_kpm" else
                                (ewc.reference if ewc and ewc.reference else "builtin:pydoc"))
    if source == TRAIN_DATA:
        examples = [{k: v for k, v in ex.items() if k != EXAMPLE_INDEX} for ex in train[:lora.init_examples]]
    else:
        examples = general_text_examples(source, tokenizer, lora.init_max_length, lora.init_examples,
                                         seed=recipe.train.seed)
    collate = Collator(tokenizer.pad_token_id)
    key = fingerprint(base_fingerprint, lora.model_dump(include={"init", "r", "target_modules", "layers"}),
                      data_fingerprint(examples))
    suffix = ".safetensors" if lora.init == "eva" else ".pt"  # CorDA's covariance is PEFT's torch.save file
    return (lambda: (collate(examples[i:i + 8]) for i in range(0, len(examples), 8)),
            cache_dir() / "lora_init" / f"{key}{suffix}")


def reference_examples(recipe: Recipe, tokenizer) -> list[dict]:
    ewc = recipe.regularizers.ewc
    return general_text_examples(ewc.reference, tokenizer, ewc.max_length, ewc.num_examples,
                                 seed=recipe.train.seed)


def compute_fisher(recipe: Recipe, model, tokenizer, base_fingerprint: str):
    """Estimate the EWC Fisher on the recipe's reference data; returns (fisher, metadata)."""
    ewc = recipe.regularizers.ewc
    examples = reference_examples(recipe, tokenizer)
    fisher = estimate_fisher(model, examples, Collator(tokenizer.pad_token_id), ewc.estimator,
                             ewc.batch_size)
    metadata = {"model_fingerprint": base_fingerprint, "data_fingerprint": data_fingerprint(examples),
                "estimator": ewc.estimator, "num_examples": len(examples), "reference": ewc.reference,
                "world_size": world_size()}
    return fisher, metadata


def fisher_for(recipe: Recipe, model, tokenizer, base_fingerprint: str):
    """The recipe's Fisher: a given file, else the cache, else estimated now and cached."""
    ewc = recipe.regularizers.ewc
    if ewc.fisher:
        fisher, metadata = load_fisher(ewc.fisher, model, base_fingerprint)
        return fisher, {**metadata, "path": str(ewc.fisher)}  # the path: tracking logs the file
    modules = sorted(f.key for f in lora_factors(model))
    # keyed by the reference tokens too: the same settings over changed text are another Fisher
    reference = data_fingerprint(reference_examples(recipe, tokenizer))
    key = fingerprint(base_fingerprint, ewc.model_dump(exclude={"weight"}), recipe.train.seed, modules, reference)
    path = cache_dir() / "fisher" / f"{key}.safetensors"
    if path.is_file():
        try:
            fisher, metadata = load_fisher(path, model, base_fingerprint)
            if is_main_process():
                print(f"fisher: cached {path}")
            return fisher, {**metadata, "path": str(path)}
        except UsageError as exc:  # a cache entry can be computed again
            if is_main_process():
                print(f"fisher: {exc}; estimating it again")
    fisher, metadata = compute_fisher(recipe, model, tokenizer, base_fingerprint)
    if is_main_process():
        save_fisher(path, fisher, metadata)
    return fisher, {**metadata, "path": str(path)}


def training_arguments(recipe: Recipe, output_dir: Path, has_val: bool) -> TrainingArguments:
    t, reg = recipe.train, recipe.regularizers
    eval_strategy = ("steps" if t.eval_steps else "epoch") if has_val else "no"
    save_strategy = "steps" if t.save_steps or (t.early_stopping and t.eval_steps) else "epoch"
    return TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate,
        num_train_epochs=t.epochs, max_steps=t.max_steps or -1, lr_scheduler_type=t.lr_scheduler,
        # transformers 5 reads a warmup_steps below 1 as a fraction of the steps (warmup_ratio is gone)
        warmup_steps=t.warmup_ratio, max_grad_norm=t.max_grad_norm, seed=t.seed,
        weight_decay=reg.weight_decay, label_smoothing_factor=reg.label_smoothing,
        neftune_noise_alpha=reg.neftune_alpha,
        logging_steps=t.logging_steps, eval_strategy=eval_strategy, eval_steps=t.eval_steps,
        save_strategy=save_strategy, save_steps=t.save_steps or t.eval_steps,
        save_total_limit=None if t.select else 2,  # selection chooses among every checkpoint
        load_best_model_at_end=t.early_stopping is not None and has_val,
        metric_for_best_model="eval_loss", greater_is_better=False,
        bf16=t.bf16 or recipe.model.dtype == "bfloat16", fp16=recipe.model.dtype == "float16",
        use_cpu=not torch.cuda.is_available(), report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=False,
        **({"optim": "sgd"} if t.optimizer == "sgd" else {}))  # else the Trainer's default AdamW


class PenaltyNeeds:
    """What penalties ask for by name (`Penalty.needs`), each made once when first asked for, and
    what run.json records of it (`records`). The training set gains each example's index when a
    penalty looks examples up by it (the top-k reference cache)."""

    def __init__(self, recipe: Recipe, model, tokenizer, train: list[dict], base_fingerprint: str):
        self.recipe, self.model, self.tokenizer, self.base_fingerprint = recipe, model, tokenizer, base_fingerprint
        self.train = train
        self.made: dict[str, Any] = {}
        self.records: dict[str, dict] = {}

    def build(self, name: str, config):
        """The penalty `name` with everything it needs."""
        cls = PENALTIES[name]
        return cls(config, **{need: self._made(need, config) for need in cls.needs(config)})

    def _made(self, need: str, config):
        if need not in self.made:
            self.made[need], self.records[need] = getattr(self, need)(config)
        return self.made[need]

    def fisher(self, config):
        return fisher_for(self.recipe, self.model, self.tokenizer, self.base_fingerprint)

    def reference_cache(self, config):
        cache, record = topk_reference_for(self.model, self.train, Collator(self.tokenizer.pad_token_id),
                                           self.base_fingerprint, config.top_k, config.temperature,
                                           self.recipe.train.batch_size)
        self.train = [{**example, EXAMPLE_INDEX: i} for i, example in enumerate(self.train)]  # for its lookup
        if is_main_process():
            how = "cached" if record["cached"] else "computed"
            print(f"kl reference: top-{record['top_k']} base log-probs at {record['positions']} "
                  f"positions, {how}: {record['path']}")
        return cache, record


def build_trainer(recipe: Recipe, output_dir: Path) -> tuple[RegularizedTrainer, RunRecord]:
    """Everything up to `trainer.train()`: the trainer, and the run record to write."""
    tokenizer, data, model, base_fingerprint = prepare(recipe)
    if is_main_process():
        st = data.stats
        print(f"data: {st['n_train']} train ({st['n_replay']} replay), {st['n_val']} val, "
              f"{st['n_truncated']} truncated to {st['max_length']} tokens, "
              f"{st['n_dropped_all_masked']} dropped with no completion token left")
        if "base_replay" in st:
            br = st["base_replay"]
            how = "cached" if br["cached"] else f"generated in {br['seconds']} s"
            print(f"base replay: {br['num_samples']} samples, {br['tokens']} tokens, {how}, "
                  f"{br['per_batch']} of every batch of {br['batch_size']}: {br['path']}")
        if "example_weights" in st:
            ew, w = st["example_weights"], st["example_weights"]["weight"]
            print(f"example weights: {ew['rule']}, tau {ew['temperature']:.4g} ({ew['temperature_from']}), weights "
                  f"{w['min']:.3g} to {w['max']:.3g} (median {w['median']:.3g}), base losses "
                  f"{'cached' if ew['cached'] else 'computed'}: {ew['path']}")
    needs = PenaltyNeeds(recipe, model, tokenizer, data.train, base_fingerprint)
    penalties = [needs.build(name, cfg) for name, cfg in recipe.penalties().items()]
    probe = recipe.train.retention_probe
    chunks = probe_chunks(probe, tokenizer) if probe else None
    if recipe.train.select and recipe.train.select.metric == "eval_loss" and not data.val:
        raise UsageError("train.select.metric eval_loss needs validation data (data.val or data.val_fraction)")
    args = training_arguments(recipe, output_dir, has_val=bool(data.val))
    callbacks = []
    if recipe.train.early_stopping and data.val:
        es = recipe.train.early_stopping
        callbacks.append(EarlyStoppingCallback(es.patience, es.min_delta))
    trainer = RegularizedTrainer(
        model=model, args=args, train_dataset=needs.train, eval_dataset=data.val or None,
        data_collator=Collator(tokenizer.pad_token_id), processing_class=tokenizer,
        penalties=penalties, callbacks=callbacks, train_kl=bool(probe and probe.train_kl),
        loss=recipe.train.loss, loss_head=recipe.train.loss_head, head_chunk_size=recipe.train.head_chunk_size)
    if recipe.regularizers.base_replay is not None:
        use_mixed_batches(trainer, data, recipe.regularizers.base_replay.ratio, recipe.train.seed)
    if recipe.lora.init in INITS_REWRITING_BASE and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise UsageError(f"lora.init {recipe.lora.init}: not available under FSDP or DeepSpeed (a gradient hook "
                         "freezes half of each LoRA factor by its rows, which sharding splits across ranks)")
    if probe:
        trainer.add_callback(RetentionProbeCallback(trainer, probe, chunks, base_fingerprint,
                                                    every_checkpoint=recipe.train.select is not None))
    record = RunRecord(recipe=resolved(recipe), versions=versions(), world_size=args.world_size,
                       command=sys.argv, model_fingerprint=base_fingerprint, parameters=count_parameters(model),
                       data={**data.stats, "train_fingerprint": data_fingerprint(data.train)},
                       fisher=needs.records.get("fisher"), reference_cache=needs.records.get("reference_cache"),
                       penalties=[p.name for p in penalties])
    return trainer, record


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGINT, finish the current step, save a checkpoint and stop."""

    def __init__(self):
        self.signal: int | None = None

    def handle(self, signum, frame) -> None:
        self.signal = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True


@contextlib.contextmanager
def _stop_on_signals(stopper: GracefulStop):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stopper.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class RunObserver(Protocol):
    """What watches a run from outside training (W&B tracking): told when it starts and ends.
    Training never imports the observer; the command that starts the run passes it in."""

    def start(self, recipe: Recipe, trainer: RegularizedTrainer, output_dir: Path, record: RunRecord,
              resume: bool) -> Any: ...

    def finish(self, handle: Any, output_dir: Path, record: RunRecord, exit_code: int = 0) -> None: ...


class _Unobserved:
    def start(self, *args) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def finish(self, *args, **kwargs) -> None:
        return None


def train(recipe: Recipe, output_dir: Path | None = None, resume: bool = False,
          observer: RunObserver | None = None) -> Path:
    """Fine-tune under the recipe; returns the run directory.

    resume: continue from the newest complete checkpoint in output_dir (same recipe required);
    the Trainer restores the model, optimiser, scheduler, RNG states and the data position.
    observer.start returns a context manager the training loop runs inside (W&B closes its run
    when an error escapes it). run.json says `failed` or `interrupted` on every way out
    (`faults.recorded`).
    """
    output_dir = Path(output_dir or recipe.output_dir)
    with recorded(output_dir):
        return _train(recipe, output_dir, resume, observer)


def _train(recipe: Recipe, output_dir: Path, resume: bool, observer: RunObserver | None) -> Path:
    observer = observer or _Unobserved()
    started = previous_run(recipe, output_dir, resume)  # before a model loads: fails fast
    if resume and started is not None and started.status == "completed":
        # resuming the Trainer at its last step would train one step more than the recipe says
        if is_main_process():
            print(f"resume: {output_dir}: the run completed at step {started.global_step}; nothing to train")
        return output_dir
    trainer, record = build_trainer(recipe, output_dir)
    check_base(output_dir, started, record, resume)
    trainer.run_identity = record.identity  # into every checkpoint's manifest
    checkpoint = resume_point(output_dir, record) if resume else start_over(output_dir, started, record)
    watching = observer.start(recipe, trainer, output_dir, record, resume)
    stopper = GracefulStop()
    trainer.add_callback(stopper)
    if trainer.is_world_process_zero():
        if checkpoint is not None:
            print(f"resume: from {checkpoint}")
            record.resumed_from = str(checkpoint)
        record.write(output_dir)
    with _stop_on_signals(stopper), watching:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stopper.signal is not None:
        stopped = Interrupted(stopper.signal, f"stopped by {signal.Signals(stopper.signal).name} at step "
                              f"{trainer.state.global_step}; checkpoint saved in {output_dir / 'checkpoints'}; "
                              f"continue with --resume")
        if trainer.is_world_process_zero():
            record.status, record.reason = "interrupted", str(stopped)
            record.history, record.global_step = trainer.state.log_history, trainer.state.global_step
            record.write(output_dir)
        observer.finish(watching, output_dir, record, exit_code=1)
        raise stopped
    final = dict(result.metrics)
    if trainer.eval_dataset is not None:
        final.update(trainer.evaluate())
    record.history, record.final, record.global_step = trainer.state.log_history, final, trainer.state.global_step
    if recipe.train.select is not None:
        _write_selected(recipe, trainer, output_dir, record, observer, watching)
    else:
        with writing(output_dir / "adapter", ""):
            trainer.save_model(str(output_dir / "adapter"))
            # the Trainer pickles its arguments next to the adapter; nothing loads it and pickles run code
            (output_dir / "adapter" / "training_args.bin").unlink(missing_ok=True)
            if trainer.is_world_process_zero():
                write_manifest(output_dir / "adapter")
    if trainer.is_world_process_zero():
        record.status, record.adapter = "completed", "adapter"
        record.write(output_dir)
    observer.finish(watching, output_dir, record)
    return output_dir


def _write_selected(recipe: Recipe, trainer: RegularizedTrainer, output_dir: Path, record: RunRecord,
                    observer: RunObserver, watching) -> None:
    """Under train.select: the chosen checkpoint's adapter becomes adapter/; when none meets the
    bounds the run fails (exit 1) and keeps every checkpoint."""
    saved = {checkpoint_step(p): p for p in checkpoints(output_dir)  # a damaged checkpoint is no candidate
             if checkpoint_step(p) >= 0 and (p / "adapter_model.safetensors").is_file()
             and check_checkpoint(p, record.identity) is None}
    record.selection = choose(trainer.state.log_history, list(saved), recipe.train.select)
    step = record.selection["step"]
    if step is None:
        if trainer.is_world_process_zero():
            record.status = "failed"
            record.write(output_dir)
        observer.finish(watching, output_dir, record, exit_code=1)
        raise RunFailed(f"train.select: {record.selection['reason']}; {closest(record.selection)}. Every "
                        f"checkpoint is kept in {output_dir / 'checkpoints'}; no adapter/ was written")
    if trainer.is_world_process_zero():
        with writing(output_dir / "adapter", ""):
            copy_adapter(saved[step], output_dir / "adapter")
            write_manifest(output_dir / "adapter")
        print(f"select: adapter from step {step}: {record.selection['reason']}")
    record.adapter_step = step
