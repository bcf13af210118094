"""lm-evaluation-harness on the model we already hold: standard benchmarks without a rewrite.

`run_lm_eval` wraps our loaded (PEFT) model in lm-eval's `HFLM` and calls `simple_evaluate`
offline; the base is the same weights with the adapter disabled, as everywhere in the evals.
lm-eval is an optional extra (`pip install -e .[lmeval]`), imported only here and only when used.

A task is an lm-eval task name (built in, or found under `include_path`) or a path to a task
YAML. A task YAML's relative `dataset_kwargs.data_files` are read against the YAML's directory,
as `workbench.evals.tasks.local_task` reads them (lm-eval alone would read them against the
current directory), so one task file gives the same documents to both.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from workbench.config.suggest import did_you_mean
from workbench.errors import UsageError
from workbench.modeling.lora import as_base, unwrap
from workbench.scoring.scorer import ADAPTERS
from workbench.evals.tasks import load_task_yaml, resolve_data_files

# Read by huggingface_hub and datasets when they are first imported, hence set before lm_eval is.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
_BOOTSTRAP_ITERS = 1000  # stderr of mean metrics is closed-form; this caps the bootstrapped ones


def _import_lm_eval():
    """(lm_eval, HFLM, TaskManager), or the one-line hint to install the extra."""
    for key, value in _OFFLINE.items():
        os.environ.setdefault(key, value)  # an explicit setting (e.g. a machine with the hub) wins
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("lm-evaluation-harness is not installed: install the lmeval extra: "
                         "pip install -e .[lmeval]") from None
    return lm_eval, HFLM, TaskManager


def run_lm_eval(model: torch.nn.Module, tokenizer, tasks: list[str], adapter: str = "tuned",
                include_path: str | None = None, limit: int | None = None, batch_size: int = 8,
                samples: bool = False) -> dict:
    """{task: {metric: value, ..., "n_samples": int}} from lm-eval's `simple_evaluate`, zero-shot.

    Metric keys drop lm-eval's ",none" filter suffix ("acc", "acc_stderr", "acc_norm", ...).
    With `samples`, each task also carries "samples": per document, in doc_id order,
    {"doc_id", "logprobs" (one per choice, loglikelihood tasks), and the per-doc metrics}.
    `adapter="base"` evaluates the same weights with the LoRA adapter disabled.
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    if not tasks:
        raise UsageError("lm_eval: no tasks given")
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    manager = _task_manager(TaskManager, tasks, include_path)
    specs = [_task_spec(task, manager) for task in tasks]
    peft_or_plain = unwrap(model)
    lm = HFLM(pretrained=peft_or_plain, tokenizer=tokenizer, batch_size=batch_size)
    adapter_off = as_base(model) if adapter == "base" else contextlib.nullcontext()
    was_training = model.training
    try:
        with adapter_off, torch.no_grad():
            # Seeds None: simple_evaluate would otherwise reseed the caller's global RNGs (random,
            # numpy, torch) mid-run; zero-shot loglikelihood tasks draw nothing at random.
            output = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, task_manager=manager,
                                             log_samples=samples, bootstrap_iters=_BOOTSTRAP_ITERS,
                                             random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    finally:
        model.train(was_training)
    return _compact(output, samples)


def _is_yaml(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) and Path(task).is_file()


def _task_manager(TaskManager, tasks: list[str], include_path: str | None):
    """A TaskManager that knows every task; lm-eval's built-in index (~5 s) only when needed."""
    if include_path is not None and not Path(include_path).is_dir():
        raise UsageError(f"lm_eval include_path {include_path}: not a directory")
    manager = TaskManager(include_path=include_path, include_defaults=False)
    if all(_is_yaml(t) or t in manager.all_tasks for t in tasks):
        return manager
    manager = TaskManager(include_path=include_path)
    for task in tasks:
        if not (_is_yaml(task) or task in manager.all_tasks):
            hint = did_you_mean(task, manager.all_tasks, n=3)
            raise UsageError(f"lm_eval task {task!r}: not an lm-eval task name nor a task YAML{hint}")
    return manager


def _task_spec(task: str, manager) -> str | dict:
    """What to hand lm-eval: the name, or a config dict whose relative data_files are made absolute.

    Only a task YAML that our safe loader reads whole (no `include`, no `!function`) becomes a
    dict; anything else passes through for lm-eval's own loader.
    """
    entry = manager.task_index.get(task)
    path = Path(task) if _is_yaml(task) else getattr(entry, "yaml_path", None)
    if path is None:
        return task
    try:
        config = load_task_yaml(path)
    except UsageError:
        return task
    if "include" in config or "task" not in config:
        return task
    resolved = resolve_data_files(config, Path(path).parent)
    return task if resolved == config else resolved


def _compact(output: dict, samples: bool) -> dict:
    """The JSON-serialisable numbers of a `simple_evaluate` output (no configs, no documents)."""
    compact: dict[str, dict[str, Any]] = {}
    for task, metrics in output["results"].items():
        entry: dict[str, Any] = {}
        for key, value in metrics.items():
            if key == "sample_len" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "alias", stderrs lm-eval reports as "N/A", and n_samples' twin
            metric, _, filter_name = key.partition(",")
            entry[metric if filter_name in ("", "none") else key] = float(value)
        n = output.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            entry["n_samples"] = int(n)
        if samples and task in output.get("samples", {}):
            ordered = sorted(output["samples"][task], key=lambda s: s["doc_id"])
            entry["samples"] = [_sample(s) for s in ordered]
        compact[task] = entry
    return compact


def _sample(sample: dict) -> dict:
    """One document's record: its id, per-choice log-likelihoods and per-document metrics."""
    record: dict[str, Any] = {"doc_id": int(sample["doc_id"])}
    responses = sample.get("filtered_resps") or []
    if responses and all(isinstance(r, (tuple, list)) and len(r) == 2 for r in responses):
        record["logprobs"] = [float(r[0]) for r in responses]
    for key, value in sample.items():
        if key in ("doc_id", "target") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        record[key] = float(value)
    return record
