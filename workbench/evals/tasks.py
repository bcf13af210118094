"""Multiple-choice items from a local lm-evaluation-harness task file (`dataset_path: json`),
rendered with Jinja2 exactly as lm-eval does, so `multiple_choice` over `local_task(path)`
reproduces lm-eval's acc and acc_norm. BIG-bench items come from `workbench.data.bigbench`.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any

import jinja2
import yaml

from workbench.config.suggest import did_you_mean
from workbench.data.bigbench import MCItem
from workbench.data.sources import read_json_records
from workbench.config.yamlfile import read_yaml
from workbench.errors import UsageError


# lm-eval's own Jinja environment (lm_eval/utils.py): strict about undefined fields, keeps the
# template's trailing newline, and has its regex_replace filter.
_JINJA = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined,
                            keep_trailing_newline=True)
_JINJA.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)

_USED_KEYS = {"task", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "output_type",
              "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "description"}
# Keys that change nothing in a zero-shot multiple-choice run.
_INERT_KEYS = {"tag", "task_alias", "metadata", "training_split", "fewshot_split", "fewshot_delimiter",
               "should_decontaminate", "doc_to_decontamination_query", "num_fewshot", "metric_list",
               "dataset_name"}
_METRICS = {"acc", "acc_norm"}


class _PythonRef(str):
    """The value of a `!function` tag: kept as text so the loader runs no code."""


class _TaskLoader(yaml.SafeLoader):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: _PythonRef(loader.construct_scalar(node)))


def load_task_yaml(path: str | os.PathLike) -> dict:
    """An lm-eval task YAML as a dict, loaded safely; `!function` values are refused by key."""
    path = Path(path)
    config = read_yaml(path, kind="lm-eval task", loader=_TaskLoader)  # a SafeLoader: builds no objects
    for key, value in config.items():
        if isinstance(value, _PythonRef):
            raise UsageError(f"task file {path}: {key}: !function {value} runs Python code, which local "
                             "tasks do not; write it as a Jinja template or a field name")
    return config


def resolve_data_files(config: dict, base: Path) -> dict:
    """A copy of `config` with relative `dataset_kwargs.data_files` made absolute against `base`.

    lm-eval (through `datasets`) resolves them against the current directory; the workbench
    resolves them against the task file's directory, in `local_task` and in `run_lm_eval` alike.
    """
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return dict(config)

    def absolute(entry):
        if isinstance(entry, list):
            return [absolute(e) for e in entry]
        return str((base / Path(entry).expanduser()).absolute()) if isinstance(entry, str) else entry

    files = kwargs["data_files"]
    files = {k: absolute(v) for k, v in files.items()} if isinstance(files, dict) else absolute(files)
    return {**config, "dataset_kwargs": {**kwargs, "data_files": files}}


def local_task(path: str | os.PathLike, limit: int | None = None) -> list[MCItem]:
    """The multiple-choice items of an lm-eval task YAML (`dataset_path: json`), zero-shot.

    Supported: task, dataset_path: json, dataset_kwargs.data_files (relative to the YAML),
    test_split / validation_split (test first, as lm-eval), output_type: multiple_choice,
    doc_to_text / doc_to_choice / doc_to_target (templates, field names, lists, an int target),
    target_delimiter, description. Anything else that would change the items is a UsageError.
    """
    path = Path(path)
    config = load_task_yaml(path)
    task = _LocalTask(path, resolve_data_files(config, path.parent))
    docs = task.docs()[:limit]
    return [task.item(doc, doc_id) for doc_id, doc in enumerate(docs)]


class _LocalTask:
    """One validated task config and lm-eval's doc_to_* semantics over its documents."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.config = config
        self._check_keys()
        self.features: set[str] = set()

    def _error(self, message: str) -> UsageError:
        return UsageError(f"task file {self.path}: {message}")

    # --- the config ------------------------------------------------------------------------

    def _check_keys(self) -> None:
        config = self.config
        for key in config:
            if key not in _USED_KEYS | _INERT_KEYS:
                raise self._error(f"'{key}' is not supported in a local task"
                                  f"{did_you_mean(key, _USED_KEYS | _INERT_KEYS, n=3)}")
        for key in ("task", "doc_to_text", "doc_to_choice", "doc_to_target"):
            if config.get(key) is None:
                raise self._error(f"'{key}' is missing")
        if config.get("output_type") != "multiple_choice":
            raise self._error(f"output_type: {config.get('output_type')!r} is not supported "
                              "(only multiple_choice)")
        if config.get("dataset_path") != "json":
            raise self._error(f"dataset_path: {config.get('dataset_path')!r} is not supported offline "
                              "(use dataset_path: json with dataset_kwargs.data_files)")
        kwargs = config.get("dataset_kwargs")
        if not isinstance(kwargs, dict) or set(kwargs) != {"data_files"}:
            raise self._error("dataset_kwargs: give exactly data_files ({split: file.jsonl})")
        if config.get("dataset_name") is not None:
            raise self._error("dataset_name is not supported with dataset_path: json")
        if config.get("num_fewshot") not in (None, 0):
            raise self._error("num_fewshot: only zero-shot (0) is supported")
        for entry in config.get("metric_list") or []:
            if not isinstance(entry, dict) or entry.get("metric") not in _METRICS:
                raise self._error(f"metric_list: only {sorted(_METRICS)} are supported")
        if not isinstance(config.get("target_delimiter", " "), str):
            raise self._error("target_delimiter must be a string")

    def docs(self) -> list[dict]:
        """The eval split's documents: test_split if given, else validation_split."""
        split = self.config.get("test_split") or self.config.get("validation_split")
        if split is None:
            raise self._error("give test_split or validation_split")
        files = self.config["dataset_kwargs"]["data_files"]
        files = files if isinstance(files, dict) else {"train": files}  # datasets' default split
        if split not in files:
            raise self._error(f"split {split!r} has no entry in data_files (it has {sorted(files)})")
        docs = []
        for file in files[split] if isinstance(files[split], list) else [files[split]]:
            docs.extend(self._read_records(Path(file)))
        # datasets gives every row every column (None where missing); fields vs templates hinge on it
        self.features = {key for doc in docs for key in doc}
        return [{key: doc.get(key) for key in self.features} for doc in docs]

    def _read_records(self, file: Path) -> list[dict]:
        """JSON lines, or one JSON array of objects (both are what the `json` loader reads), through
        the data layer's reader; its one-line error is prefixed with this task file."""
        if not file.is_file():
            raise self._error(f"data file {file}: not found")
        try:
            records = read_json_records(file)
        except UsageError as exc:
            raise self._error(f"data file {exc}") from None
        if not records:
            raise self._error(f"data file {file} holds no records")
        return records

    # --- lm-eval's doc_to_* (lm_eval/api/task.py, ConfigurableTask) -----------------------

    def _render(self, key: str, template: str, doc: dict, doc_id: int) -> str:
        try:
            return _JINJA.from_string(template).render(**doc)
        except jinja2.TemplateError as exc:
            raise self._error(f"{key} on doc {doc_id}: {type(exc).__name__}: {exc}") from None

    def _resolve(self, key: str, doc: dict, doc_id: int) -> tuple[Any, bool]:
        """(value, rendered): a field's value, a template's rendering, or the spec itself (a list, an int)."""
        spec = self.config[key]
        if isinstance(spec, str) and spec in self.features:
            return doc[spec], False
        if isinstance(spec, str):
            return self._render(key, spec, doc, doc_id), True
        return spec, False

    def text(self, doc: dict, doc_id: int) -> str:
        value, rendered = self._resolve("doc_to_text", doc, doc_id)
        # lm-eval reads an int, or an all-digit rendering, as "one context per choice"
        if isinstance(value, int) or (rendered and value.isdigit()):
            raise self._error(f"doc_to_text on doc {doc_id} gives a number: multiple-input tasks are "
                              "not supported")
        if not isinstance(value, str):
            raise self._error(f"doc_to_text on doc {doc_id} gives {type(value).__name__}, not text")
        return value

    def choices(self, doc: dict, doc_id: int) -> list[str]:
        value, rendered = self._resolve("doc_to_choice", doc, doc_id)
        if rendered:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise self._error(f"doc_to_choice on doc {doc_id} renders {value!r}, "
                                  "not a list literal") from None
        elif isinstance(value, dict):
            value = list(value.values())
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise self._error(f"doc_to_choice on doc {doc_id} must give a non-empty list of strings, "
                              f"got {value!r}")
        return value

    def target(self, doc: dict, doc_id: int) -> Any:
        """An index, a choice's text, or a list (multiple targets), as lm-eval's doc_to_target."""
        value, rendered = self._resolve("doc_to_target", doc, doc_id)
        if rendered and value.isdigit():
            return ast.literal_eval(value)
        if rendered and len(value) >= 2 and value[0] == "[" and value[-1] == "]":
            try:
                return ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return value
        return value

    def item(self, doc: dict, doc_id: int) -> MCItem:
        choices = self.choices(doc, doc_id)
        target = self.target(doc, doc_id)
        if isinstance(target, list):
            raise self._error(f"doc_to_target on doc {doc_id} gives a list: multiple targets are "
                              "not supported")
        if isinstance(target, str):
            if target not in choices:
                raise self._error(f"doc_to_target on doc {doc_id} gives {target!r}, which is not one of the "
                                  f"choices {choices}")
            gold = choices.index(target)
        elif isinstance(target, int) and 0 <= target < len(choices):
            gold = int(target)
        else:
            raise self._error(f"doc_to_target on doc {doc_id} gives {target!r}: not an index into "
                              f"{len(choices)} choices nor a choice")
        description = self.config.get("description") or ""
        if description:  # lm-eval's resolve_field: a field of the doc, else a template
            description = doc[description] if description in doc else \
                self._render("description", description, doc, doc_id)
        return MCItem(str(description) + self.text(doc, doc_id), tuple(choices), gold, doc_id,
                      self.config.get("target_delimiter", " "))
