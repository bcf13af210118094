"""`workbench eval`: resolve runs or adapters, load the base once, score every entry, write results.

The base model is loaded once; every adapter is loaded onto it under its own PEFT adapter name
and toggled with `set_adapter` / `disable_adapter`, so there is never a second copy of the
weights. An adapter that would not change the model, or whose tensors do not all land on a
module, is reported rather than silently scored as the base.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError
from safetensors import safe_open

from workbench.data.examples import data_fingerprint, format_example, general_text_examples, task_splits
from workbench.data.sources import is_named_source, read_records
from workbench.distributed import init_distributed, is_main_process, local_device
from workbench.errors import UsageError
from workbench.modeling.load import load_model, load_tokenizer, model_fingerprint
from workbench.config.recipe import ModelSection, Recipe, describe_error
from workbench.formats.integrity import check_folder
from workbench.formats.run_record import RunRecord, describe_state, read_run, run_path, versions
from workbench.modeling.lora import adapter_method, check_adapter_fits, check_one_method, recorded_base, scaled_delta_norm
from workbench.scoring.base_cache import BaseCache
from workbench.formats.results import Entry, Results
from workbench.evals.runner import EvalData, Evaluator, Subject, TargetData
from workbench.assets.bigbench import fetch_bigbench
from workbench.evals.suite import Suite, bigbench_task, load_suite

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class AdapterSpec:
    name: str
    path: Path
    run_dir: Path | None = None
    run: RunRecord | None = None
    recipe: Recipe | None = None
    step: int | None = None  # the optimiser step the adapter was saved at, when known
    family: str = ""  # the recipe the entry belongs to: its scales, checkpoints and seeds

    def __post_init__(self):
        self.family = self.family or (self.recipe.family or self.recipe.name if self.recipe else self.name)
        if self.step is None and self.run is not None:
            self.step = self.run.adapter_step or self.run.global_step


# --- resolving what to evaluate -------------------------------------------------------------


def _check_adapter_dir(path: Path) -> None:
    """Every file there and whole (its manifest, else its format), before any model loads."""
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise UsageError(f"{path}: not a PEFT adapter directory (missing {', '.join(missing)})")
    damaged = check_folder(path)
    if damaged:
        raise UsageError(f"{path / damaged[0]}: {damaged[1]}; train again, or resume the run from a checkpoint")


def _read_run(run_dir: Path) -> tuple[RunRecord, Recipe]:
    run = read_run(run_dir)
    try:
        recipe = Recipe.model_validate(run.recipe)
    except ValidationError as exc:
        raise UsageError(f"{run_path(run_dir)}: recipe: {describe_error(exc)}") from None
    if run.status != "completed":
        raise UsageError(f"{run_path(run_dir)}: no final adapter to evaluate: the run is {describe_state(run, run_dir)}")
    return run, recipe


def resolve_specs(runs: list[Path], adapters: list[Path]) -> list[AdapterSpec]:
    specs = []
    for run_dir in runs:
        run, recipe = _read_run(run_dir)
        run_dir = run_dir if run_dir.is_dir() else run_dir.parent
        adapter = run_dir / (run.adapter or "adapter")
        _check_adapter_dir(adapter)
        specs.append(AdapterSpec(recipe.name, adapter, run_dir, run, recipe))
    for adapter in adapters:
        _check_adapter_dir(adapter)
        parent = adapter.parent
        run, recipe = _read_run(parent) if (parent / "run.json").is_file() else (None, None)
        name = recipe.name if recipe else adapter.name
        specs.append(AdapterSpec(name, adapter, parent if run else None, run, recipe))
    seen: dict[str, int] = {}
    for spec in specs:  # unique entry names: a second "baseline" becomes "baseline-2"
        seen[spec.name] = seen.get(spec.name, 0) + 1
        if seen[spec.name] > 1:
            spec.name = f"{spec.name}-{seen[spec.name]}"
    return specs


def checkpoint_specs(specs: list[AdapterSpec], wanted: str | list[int]) -> list[AdapterSpec]:
    """The saved checkpoints of each run as entries NAME:stepN: every one for "all", else the
    steps listed (each must exist in every run). A checkpoint at the final step is the final
    adapter unless early stopping restored an earlier best one, so it is not scored twice."""
    if not wanted:
        return []
    out = []
    for spec in specs:
        if spec.run_dir is None:
            continue
        saved = {int(p.name.rpartition("-")[2]): p for p in (spec.run_dir / "checkpoints").glob("checkpoint-*")
                 if p.name.rpartition("-")[2].isdigit() and (p / ADAPTER_FILES[1]).is_file()}
        steps = sorted(saved) if wanted == "all" else list(wanted)
        missing = [s for s in steps if s not in saved]
        if missing:
            raise UsageError(f"{spec.run_dir}: no checkpoint at step {', '.join(map(str, missing))} "
                             f"(saved: {', '.join(map(str, sorted(saved))) or 'none'}; see train.save_steps)")
        restored = spec.recipe is not None and spec.recipe.train.early_stopping is not None
        out += [AdapterSpec(f"{spec.name}:step{step}", saved[step], spec.run_dir, spec.run, spec.recipe, step,
                            spec.family)
                for step in steps if restored or step != spec.step]
    return out


def base_section(specs: list[AdapterSpec], base: str | None) -> ModelSection:
    if base is not None:
        return ModelSection(name=base)
    sections = {json.dumps(s.recipe.model.model_dump(), sort_keys=True) for s in specs if s.recipe}
    recorded = {recorded_base(s.path) for s in specs}  # adapter_config.json's base_model_name_or_path
    if not sections and len(recorded) == 1 and None not in recorded:
        return ModelSection(name=recorded.pop())
    if not sections:
        raise UsageError("--adapter without a run.json next to it, or a base its adapter_config.json names, "
                         "needs --base MODEL")
    if len(sections) > 1:
        raise UsageError("the runs were trained on different base models; evaluate them separately")
    return next(s.recipe for s in specs if s.recipe).model


def check_tokenizer(spec: AdapterSpec, tokenizer) -> None:
    """An adapter saved with a tokenizer must have been trained with the base's tokenizer."""
    if not (spec.path / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    try:
        saved = AutoTokenizer.from_pretrained(str(spec.path))
    except Exception as exc:  # a broken tokenizer file: say which adapter, in one line
        raise UsageError(f"{spec.path}: its tokenizer does not load ({type(exc).__name__})") from None
    if saved.get_vocab() != tokenizer.get_vocab() or saved.eos_token_id != tokenizer.eos_token_id:
        raise UsageError(f"{spec.path}: its tokenizer differs from the base model's (vocabulary "
                         f"{len(saved.get_vocab())} vs {len(tokenizer.get_vocab())} tokens): "
                         "the adapter was trained on another base")


# --- data ------------------------------------------------------------------------------------


def _chat_prompt(tokenizer, task: str):
    """The input as a user turn in the chat template, ending where the assistant's reply starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"multiple-choice task {task!r}: prompt: chat needs a tokenizer with a chat "
                         "template, and this model's has none")
    return lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)


def _mc_items(suite: Suite, suite_dir: Path, tokenizer) -> dict[str, list]:
    from workbench.data.bigbench import bigbench_mc
    from workbench.evals.tasks import local_task

    tasks = {}
    for task in suite.multiple_choice:
        if task.bigbench and task.prompt == "chat":
            items = bigbench_mc(task.bigbench, task.limit, _chat_prompt(tokenizer, task.name), delimiter="")
        elif task.bigbench:
            items = bigbench_mc(task.bigbench, task.limit)
        else:
            items = local_task(suite_dir / task.local, task.limit)
        if not items:
            raise UsageError(f"multiple-choice task {task.name!r}: no items to evaluate")
        tasks[task.name] = items
    return tasks


def _format_file(source: str, suite: Suite, tokenizer) -> list[dict]:
    t = suite.target
    return [format_example(r, tokenizer, t.format, t.max_length, f"{source} record {i + 1}")
            for i, r in enumerate(read_records(source))]


def _suite_path(source: str, suite_dir: Path) -> str:
    return source if is_named_source(source) or Path(source).is_absolute() else str(suite_dir / source)


def target_data(spec: AdapterSpec, suite: Suite, suite_dir: Path, tokenizer,
                train_data: str | None = None) -> TargetData | None:
    """Held-out and training examples (for overfitting): a run's own split, else `train_data` (`eval
    --train-data`, from the working directory), else the suite's `target.train` (from its directory)."""
    t = suite.target
    if t is None:
        return None
    members, heldout = [], []
    if spec.recipe is not None:
        members, heldout = task_splits(spec.recipe.data, tokenizer, spec.recipe.train.seed)
    elif train_data or t.train:
        members = _format_file(train_data or _suite_path(t.train, suite_dir), suite, tokenizer)
    if t.heldout:
        heldout = _format_file(_suite_path(t.heldout, suite_dir), suite, tokenizer)
    if not heldout:
        if spec.recipe is None and not (train_data or t.train):
            return None  # nothing names target data: skip the target evals
        raise UsageError(f"{spec.name}: no held-out target examples (the run has no validation split; "
                         "set target.heldout in the suite)")
    n_over = suite.overfitting.num_examples if suite.overfitting else 0
    members = random.Random(0).sample(members, min(n_over, len(members)))
    heldout = heldout[:max(t.num_examples, n_over)]
    return TargetData(heldout, members, data_fingerprint(heldout + members))


def general_data(suite: Suite, tokenizer) -> list[dict] | None:
    g = suite.general
    if g is None:
        return None
    return general_text_examples(g.source, tokenizer, g.chunk_length, g.num_chunks, seed=g.seed)


# --- adapters on one base ----------------------------------------------------------------------


def load_adapters(model, specs: list[AdapterSpec]):
    """The PEFT model with every adapter loaded under the name a0, a1, ...; checks each one landed."""
    from peft import PeftModel
    check_one_method([spec.path for spec in specs])
    peft_model = None
    for i, spec in enumerate(specs):
        name = f"a{i}"
        check_adapter_fits(model if peft_model is None else peft_model.get_base_model(),
                           spec.path / "adapter_model.safetensors")
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(spec.path), adapter_name=name)
        else:
            peft_model.load_adapter(str(spec.path), adapter_name=name)
        _check_loaded(peft_model, name, spec.path)
    return peft_model


def _check_loaded(peft_model, name: str, path: Path) -> None:
    """Every adapted module in the file (LoRA's A, OSF's U_low) must land, or "tuned" scores the base."""
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        saved = sum(1 for key in f.keys() if "lora_A" in key or key.endswith("osf_svd_params.U_low"))
    loaded = sum(1 for m in peft_model.modules() if name in getattr(m, "lora_A", getattr(m, "osf_svd_params", {})))
    if saved == 0 or loaded != saved:
        raise UsageError(f"{path}: {saved} adapted modules in the file, {loaded} found in the base model: "
                         "the adapter does not fit this base")


# --- the command ----------------------------------------------------------------------------


@dataclass
class Session:
    """The suite's data and the base model loaded once with every adapter on it (a0, a1, ...):
    `workbench eval` scores its entries with it, `workbench calibrate` one adapter at many scales."""

    suite: Suite
    suite_path: str | Path
    suite_dir: Path
    specs: list[AdapterSpec]
    finals: int  # specs[:finals] are the runs and adapters named; the rest their checkpoints
    section: ModelSection
    base_fp: str
    evaluator: Evaluator
    shared: EvalData
    targets: dict[str, TargetData | None]
    norms: dict[tuple[int, float], float] = field(default_factory=dict)

    def entry(self, i: int, scale: float = 1.0, light: bool = False) -> Entry:
        """The results entry of adapter i at `scale`, scored on the loaded model."""
        spec = self.specs[i]
        if (i, scale) not in self.norms:
            self.evaluator.peft.set_adapter(f"a{i}")  # the weight change's norm at this scale
            self.norms[i, scale] = scaled_delta_norm(self.evaluator.peft, scale)
        return _evaluate_entry(self.evaluator, Subject(_entry_name(spec, scale), f"a{i}", scale, light),
                               spec, self.norms[i, scale], self.shared, self.targets[spec.name])

    def results(self, entries: list[Entry]) -> Results:
        """The results file (docs/results.md) of these entries."""
        cache = self.evaluator.cache
        return Results(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            suite={"name": self.suite.name, "path": str(self.suite_path), "fingerprint": self.suite.base_fingerprint()},
            base={"model": self.section.name, "fingerprint": self.base_fp,
                  "cache": {"hits": sorted(set(cache.hits)), "misses": sorted(set(cache.misses))},
                  "forward_calls": dict(self.evaluator.forward_calls)},
            versions=versions(), entries=entries)


def open_session(suite_path: str | Path, runs: list[Path] = (), adapters: list[Path] = (), base: str | None = None,
                 use_cache: bool = True, checkpoints: bool = True, train_data: str | None = None) -> Session:
    """Resolve and check what to evaluate (bad input raises UsageError before the model loads
    where it can), read the suite's data, load the base once and every adapter onto it. With
    `checkpoints`, a run's checkpoints the suite names are loaded too."""
    suite, suite_dir = load_suite(suite_path)
    specs = resolve_specs(list(runs), list(adapters))
    if not specs:
        raise UsageError("nothing to evaluate: give --run RUN_DIR or --base MODEL --adapter DIR")
    finals = len(specs)
    if checkpoints:
        specs += checkpoint_specs(specs, suite.checkpoints)
    section = base_section(specs, base)
    recipes = [spec.recipe.data for spec in specs if spec.recipe]
    tasks = suite.bigbench_tasks() + [t for data in recipes for t in map(bigbench_task, (data.train, data.val)) if t]
    fetch_bigbench(list(dict.fromkeys(tasks)))  # one pass over the 358 MB archive for them all, not one a task
    tokenizer = load_tokenizer(section)
    for spec in specs:
        check_tokenizer(spec, tokenizer)
    shared = EvalData(general_data(suite, tokenizer), _mc_items(suite, suite_dir, tokenizer), None)
    targets = {spec.name: target_data(spec, suite, suite_dir, tokenizer, train_data) for spec in specs}
    unmeasured = [s.name for s in specs if suite.overfitting and not (targets[s.name] and targets[s.name].members)]
    if unmeasured and is_main_process():
        print(f"eval: {', '.join(unmeasured)}: no training data (give eval --train-data FILE, or the suite's "
              "target.train), so overfitting.* is not measured: membership inference, extraction, the loss gap")
    model, tokenizer = load_model(section, tokenizer)
    base_fp = model_fingerprint(model)
    for spec in specs:
        if spec.run and spec.run.model_fingerprint not in (None, base_fp):
            raise UsageError(f"{spec.run_dir}: trained on base weights {spec.run.model_fingerprint}, "
                             f"but {section.name} has {base_fp}")
    peft_model = load_adapters(model, specs)
    if not getattr(model, "is_loaded_in_4bit", False):  # a 4-bit model is placed as it loads
        peft_model.to(local_device())
    evaluator = Evaluator(peft_model, tokenizer, suite, BaseCache(base_fp, enabled=use_cache))
    return Session(suite, suite_path, suite_dir, specs, finals, section, base_fp, evaluator, shared, targets)


def run_eval(suite_path: str | Path, runs: list[Path] = (), adapters: list[Path] = (), base: str | None = None,
             out: str | Path | None = None, use_cache: bool = True, train_data: str | None = None) -> dict:
    """Evaluate every run/adapter against the base under the suite; returns the results.json payload.

    Under `accelerate launch` with several processes every rank loads the model on its own device
    and scores a share of each component's items; every rank then holds all the scores and
    computes the same metrics, and the main process writes."""
    init_distributed()
    session = open_session(suite_path, runs, adapters, base, use_cache, train_data=train_data)
    suite = session.suite
    entries = []
    for i in range(len(session.specs)):
        final = i < session.finals
        scalable = adapter_method(session.evaluator.peft, f"a{i}") == "LORA"  # OSF has no alpha / r to scale
        scales = [1.0] + [s for s in suite.scales if s != 1.0] if final and scalable else [1.0]  # checkpoints: 1
        for scale in scales:
            entries.append(session.entry(i, scale, light=suite.light_points and (not final or scale != 1.0)))
    results = session.results(entries)
    if suite.lm_eval is not None:
        results.lm_eval = _lm_eval(session.evaluator, session.specs, suite, session.suite_dir)
    if out is not None and is_main_process():
        results.write(out)
    return results.payload()


def _entry_name(spec: AdapterSpec, scale: float) -> str:
    return spec.name if scale == 1.0 else f"{spec.name}@{scale:g}"


def _evaluate_entry(evaluator: Evaluator, entry: Subject, spec: AdapterSpec, norm: float,
                    shared: EvalData, target: TargetData | None) -> Entry:
    start = time.perf_counter()
    data = EvalData(shared.general, shared.multiple_choice, target)
    metrics, curves, items = evaluator.evaluate_items(entry, data)
    if is_main_process():
        print(f"eval: {entry.name}: {len(metrics)} metrics in {time.perf_counter() - start:.1f} s", flush=True)
    return Entry(name=entry.name, adapter=str(spec.path), run=str(spec.run_dir) if spec.run_dir else None,
                 family=spec.family, seed=spec.recipe.train.seed if spec.recipe else None, step=spec.step,
                 scale=entry.scale, light=entry.light, changes_model=norm > 0.0, delta_norm=norm,
                 metrics=metrics, curves=curves, items=items)


def _lm_eval(evaluator: Evaluator, specs: list[AdapterSpec], suite: Suite, suite_dir: Path) -> dict:
    from workbench.evals.lmeval import run_lm_eval

    cfg = suite.lm_eval
    include = str(suite_dir / cfg.include_path) if cfg.include_path else None
    kwargs = dict(tasks=cfg.tasks, include_path=include, limit=cfg.limit, batch_size=suite.batch_size)
    out = {"base": run_lm_eval(evaluator.peft, evaluator.tokenizer, adapter="base", **kwargs)}
    for i, spec in enumerate(specs):
        evaluator.peft.set_adapter(f"a{i}")
        out[spec.name] = run_lm_eval(evaluator.peft, evaluator.tokenizer, adapter="tuned", **kwargs)
    return out



