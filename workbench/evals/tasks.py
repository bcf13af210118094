"""Eval items from BIG-bench and from local lm-evaluation-harness task files.

Two sources, both offline:

- BIG-bench: the PyPI sdist `bigbench==1.0.0` carries every task's `task.json`. `fetch_bigbench`
  downloads it once with pip, streams through it and keeps only the named tasks in the cache
  (`<cache>/bigbench/<task>/task.json`); the 358 MB archive itself is not kept. A subtask is named
  `task/subtask` (e.g. `arithmetic/1_digit_addition`).
- A local lm-eval task YAML (`dataset_path: json`), rendered with Jinja2 exactly as lm-eval does,
  so `multiple_choice` over `local_task(path)` reproduces lm-eval's acc and acc_norm.

Prompt format for BIG-bench (the one `bigbench-smollm2-survey.md` measured): the context is
`"Q: {input}\nA:"` and each choice, or the generative target, follows after one space.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import jinja2
import yaml
from filelock import FileLock

from workbench.config.suggest import did_you_mean
from workbench.config.yamlfile import read_yaml
from workbench.errors import UsageError
from workbench.io import atomic_path, cache_dir


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: each choice is scored as `context + delimiter + choice`."""

    context: str
    choices: tuple[str, ...]
    gold: int
    doc_id: int  # the document's index in its source (BIG-bench examples, or the eval split)
    delimiter: str = " "  # lm-eval's target_delimiter


# ================================================================ BIG-bench

BIGBENCH_SDIST = "bigbench==1.0.0"
_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_ENV = "WORKBENCH_BIGBENCH_SDIST"  # a local copy of the sdist (or a test archive): no download
_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")
_INDEX = "index.json"  # every task name in the archive, for did-you-mean without re-reading it


def _bigbench_root() -> Path:
    return cache_dir() / "bigbench"


def fetch_bigbench(names: list[str], sdist: str | os.PathLike | None = None) -> dict[str, Path]:
    """{name: path of its task.json in the cache}, extracting the tasks not cached yet.

    The archive is `sdist`, else `$WORKBENCH_BIGBENCH_SDIST`, else downloaded from PyPI (and
    checked against a pinned sha256). It is read once, whatever the number of missing tasks.
    Raises UsageError for a name that is not a task in the archive, with a did-you-mean.
    """
    root = _bigbench_root()
    for name in names:
        if not _NAME.fullmatch(name) or {".", ".."} & set(name.split("/")):
            raise UsageError(f"bigbench task {name!r}: not a task name (expected 'task' or 'task/subtask')")
    missing = [n for n in dict.fromkeys(names) if not (root / n / "task.json").is_file()]
    if missing:
        _check_index(root, missing)
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / ".lock")):
            missing = [n for n in missing if not (root / n / "task.json").is_file()]  # another process?
            if missing:
                _extract(root, missing, sdist or os.environ.get(SDIST_ENV))
    return {name: root / name / "task.json" for name in names}


def _check_index(root: Path, names: list[str]) -> None:
    """Refuse unknown names before downloading anything, once an earlier fetch listed the archive."""
    index = root / _INDEX
    if not index.is_file():
        return
    known = set(json.loads(index.read_text()))
    for name in names:
        if name not in known:
            raise UsageError(f"bigbench task {name!r} is not in {BIGBENCH_SDIST}{did_you_mean(name, known, n=3)}")


def _extract(root: Path, names: list[str], sdist: str | os.PathLike | None) -> None:
    """Copy the named tasks' task.json out of the archive (call under the lock)."""
    for stale in root.glob(".sdist-*"):  # a download dir left by a killed process
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.rglob(".*.tmp"):  # a write a killed process never renamed into place
        stale.unlink(missing_ok=True)
    if sdist is not None:
        found, known = _scan_sdist(Path(sdist), set(names))
    else:
        print(f"fetching {BIGBENCH_SDIST} from PyPI (358 MB) for {', '.join(names)} ...",
              file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=".sdist-", dir=root) as tmp:
            found, known = _scan_sdist(_download_sdist(Path(tmp)), set(names))
    with atomic_path(root / _INDEX) as tmp_index:
        tmp_index.write_text(json.dumps(sorted(known)))
    for name in names:
        if name not in found:
            raise UsageError(f"bigbench task {name!r} is not in {BIGBENCH_SDIST}{did_you_mean(name, known, n=3)}")
    # Check every file before writing any, so a bad archive leaves the cache as it was.
    for name, data in found.items():
        try:
            json.loads(data)
        except ValueError as exc:
            raise UsageError(f"bigbench task {name!r}: its task.json in the archive is not JSON "
                             f"({exc})") from None
    for name, data in found.items():
        with atomic_path(root / name / "task.json") as tmp:
            tmp.write_bytes(data)


def _task_name(member: str) -> str | None:
    """`task` or `task/subtask` for `<top>/bigbench/benchmark_tasks/<...>/task.json`, else None."""
    parts = member.split("/")
    for i in range(len(parts) - 1):
        if parts[i:i + 2] == ["bigbench", "benchmark_tasks"]:
            rest = parts[i + 2:]
            if rest[-1:] == ["task.json"] and 2 <= len(rest) <= 3:
                return "/".join(rest[:-1])
    return None


def _scan_sdist(sdist: Path, wanted: set[str]) -> tuple[dict[str, bytes], set[str]]:
    """One streaming pass over the archive: the wanted tasks' bytes, and every task name in it."""
    found: dict[str, bytes] = {}
    known: set[str] = set()
    try:
        with tarfile.open(sdist, "r|*") as archive:  # stream: no random access into 358 MB
            for member in archive:
                name = _task_name(member.name)
                if name is None or not member.isfile():
                    continue
                known.add(name)
                if name in wanted:
                    found[name] = archive.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise UsageError(f"bigbench: cannot read the archive {sdist} ({exc})") from None
    if not known:
        raise UsageError(f"bigbench: {sdist} holds no bigbench/benchmark_tasks/*/task.json")
    return found, known


def _download_sdist(workdir: Path) -> Path:
    """Download the pinned sdist with pip into `workdir` and check its digest; its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "bigbench",
               "--quiet", BIGBENCH_SDIST, "-d", str(workdir)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = list(workdir.glob("bigbench-*.tar.gz"))
    if result.returncode != 0 or len(archives) != 1:
        detail = (result.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
        raise UsageError(f"bigbench: could not download {BIGBENCH_SDIST} from PyPI ({detail}); "
                         f"or point ${SDIST_ENV} at a local copy")
    digest = hashlib.sha256()
    with open(archives[0], "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != _SDIST_SHA256:
        raise UsageError(f"bigbench: {archives[0].name} has sha256 {digest.hexdigest()}, "
                         f"expected {_SDIST_SHA256}")
    return archives[0]


def _bigbench_examples(name: str) -> list[dict]:
    """The task's examples, fetched if needed; a parent task split into subtasks says which exist."""
    path = fetch_bigbench([name])[name]
    task = json.loads(path.read_text())
    examples = task.get("examples")
    if isinstance(examples, list) and examples:
        return examples
    index = _bigbench_root() / _INDEX
    known = json.loads(index.read_text()) if index.is_file() else []
    subtasks = sorted(n for n in known if n.startswith(name + "/"))
    shown = ", ".join(subtasks[:5]) + (", ..." if len(subtasks) > 5 else "")
    hint = f"; name a subtask: {shown}" if subtasks else ""
    raise UsageError(f"bigbench task {name!r} has no examples of its own{hint}")


def bigbench_prompt(text: str) -> str:
    """The context every BIG-bench item is scored or trained after."""
    return f"Q: {text}\nA:"


def bigbench_mc(name: str, limit: int | None = None) -> list[MCItem]:
    """The task's multiple-choice items (examples with `target_scores`), in file order.

    Choices keep the file's order; gold is the first choice with the highest score. Examples
    without target_scores are skipped and counted on stderr; `limit` caps the items returned.
    """
    items, skipped = [], 0
    for doc_id, example in enumerate(_bigbench_examples(name)):
        if limit is not None and len(items) >= limit:
            break
        scores = example.get("target_scores")
        if not scores:
            skipped += 1
            continue
        if not all(isinstance(s, (int, float)) for s in scores.values()):
            raise UsageError(f"bigbench task {name!r}: example {doc_id} has non-numeric target_scores")
        values = list(scores.values())
        gold = values.index(max(values))
        items.append(MCItem(bigbench_prompt(example["input"]), tuple(scores), gold, doc_id))
    if skipped:
        print(f"bigbench {name}: skipped {skipped} example(s) without target_scores", file=sys.stderr)
    if not items:
        raise UsageError(f"bigbench task {name!r} has no multiple-choice examples (no target_scores)")
    return items


def bigbench_generative(name: str, limit: int | None = None) -> list[dict]:
    """The task's examples with a target as prompt/completion records, in file order.

    {"prompt": "Q: {input}\\nA:", "completion": " " + target} (the first target when there are
    several). The completion starts with the space, as a choice does in `bigbench_mc`, so
    training on these and scoring multiple choice see the same boundary; the trainer appends eos.
    """
    records = []
    for example in _bigbench_examples(name):
        if limit is not None and len(records) >= limit:
            break
        target = example.get("target")
        if isinstance(target, list):
            target = target[0] if target else None
        if isinstance(target, str) and target:
            records.append({"prompt": bigbench_prompt(example["input"]), "completion": " " + target})
    if not records:
        raise UsageError(f"bigbench task {name!r} has no examples with a string target")
    return records


# ================================================================ local lm-eval task files

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
        """JSON lines, or one JSON array of objects (both are what the `json` loader reads)."""
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise self._error(f"data file {file}: cannot read it ({reason})") from None
        if text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except ValueError as exc:
                raise self._error(f"data file {file}: not valid JSON ({exc})") from None
            numbered = list(enumerate(records if isinstance(records, list) else [records], 1))
        else:
            numbered = []
            for line_no, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        numbered.append((line_no, json.loads(line)))
                    except ValueError as exc:
                        raise self._error(f"data file {file}: line {line_no} is not valid JSON "
                                          f"({exc})") from None
        for where, record in numbered:
            if not isinstance(record, dict):
                raise self._error(f"data file {file}: record {where} is not a JSON object")
        if not numbered:
            raise self._error(f"data file {file} holds no records")
        return [record for _, record in numbered]

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
