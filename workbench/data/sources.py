"""Where records come from: files (JSONL, JSON, CSV, Parquet, save_to_disk directories), the
builtin sources, and BIG-bench tasks. Every failure on bad input is a one-line UsageError naming
the file and, for JSONL, the line. No torch.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Callable

from workbench.config.suggest import did_you_mean
from workbench.data import vendored
from workbench.data.bigbench import bigbench_generative
from workbench.errors import UsageError, first_line


# ---------------------------------------------------------------- builtin data


def _pydoc_topics(held_out: bool) -> list[dict]:
    """Python's own documentation topics: general English/technical text shipped with CPython.

    Every fifth topic (in sorted order, a quarter of the text) is held out for evals, so general text used in training
    (replay, the EWC reference) never overlaps the text that retention is measured on.
    """
    from pydoc_data.topics import topics

    return [{"text": topics[key]} for i, key in enumerate(sorted(topics)) if (i % 5 == 2) == held_out]


def _pydoc() -> list[dict]:
    return _pydoc_topics(held_out=False)


def _pydoc_heldout() -> list[dict]:
    return _pydoc_topics(held_out=True)


def _tiny_reverse(n: int = 256) -> list[dict]:
    """A synthetic task a tiny model can learn in seconds: reverse a short lowercase string."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(n)]
    return [{"prompt": f"Reverse: {w}\nAnswer: ", "completion": w[::-1]} for w in words]


# The study's vendored sets (workbench/data/vendored.py): targets with a disjoint test part, and
# Factbook prose with a held-out part, as pydoc's.
BUILTINS: dict[str, Callable[[], list[dict]]] = {
    "pydoc": _pydoc, "pydoc_heldout": _pydoc_heldout, "tiny_reverse": _tiny_reverse,
    "gsm8k": lambda: vendored.gsm8k("train"), "gsm8k_test": lambda: vendored.gsm8k("test"),
    "nq_open": lambda: vendored.nq_open("train"), "nq_open_test": lambda: vendored.nq_open("test"),
    "factbook": lambda: vendored.factbook(held_out=False), "factbook_heldout": lambda: vendored.factbook(held_out=True)}


def _builtin(name: str) -> list[dict]:
    if name not in BUILTINS:
        hint = did_you_mean(name, BUILTINS, prefix="builtin:")
        known = ", ".join(f"builtin:{n}" for n in BUILTINS)
        raise UsageError(f"unknown data source 'builtin:{name}'{hint}; known: {known}")
    return BUILTINS[name]()


# ---------------------------------------------------------------- reading files


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    # Decode line by line (not the whole file) so a bad byte is reported with its line number.
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{path}:{number}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def read_json_records(path: Path) -> list[dict]:
    """A `.json` file is either one array of objects or JSON Lines under another name."""
    head = path.read_bytes().lstrip()[:1]
    if head != b"[":
        return _read_jsonl(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: invalid JSON: {first_line(exc)}") from None
    bad = next((r for r in records if not isinstance(r, dict)), None)
    if bad is not None:
        raise UsageError(f"{path}: expected an array of objects, found a {type(bad).__name__}")
    return records


def _read_csv(path: Path) -> list[dict]:
    import pandas as pd

    try:
        # All columns as text: a completion "42" must stay the string "42", an empty cell "".
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable CSV: {first_line(exc)}") from None
    return frame.to_dict(orient="records")


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pyarrow (not pandas) so nested columns like `messages` come back as plain lists/dicts.
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{path}: unreadable Parquet: {first_line(exc)}") from None


def _read_saved_dataset(path: Path) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{path}: not a dataset saved with save_to_disk: {first_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UsageError(f"{path}: saved DatasetDict has no 'train' split (has: {', '.join(loaded)})")
        loaded = loaded["train"]
    return loaded.to_list()


READERS: dict[str, Callable[[Path], list[dict]]] = {
    ".jsonl": _read_jsonl, ".json": read_json_records, ".csv": _read_csv, ".parquet": _read_parquet}


BIGBENCH_SPLITS = {"train": (0.2, 1.0), "val": (0.1, 0.2), "test": (0.0, 0.1)}


def _bigbench(spec: str) -> list[dict]:
    """`bigbench:TASK[:SPLIT]`: a BIG-bench task's targets as prompt/completion records.

    The split is a fixed seeded shuffle: test is the first 10%, val the next 10%, train the rest,
    so recipes and eval suites name the same disjoint examples without writing any files.
    """
    name, _, split = spec.partition(":")
    if split and split not in BIGBENCH_SPLITS:
        raise UsageError(f"bigbench:{spec}: unknown split {split!r} (expected {', '.join(BIGBENCH_SPLITS)})")
    records = bigbench_generative(name)
    if not split:
        return records
    random.Random(0).shuffle(records)
    low, high = BIGBENCH_SPLITS[split]
    return records[round(low * len(records)):round(high * len(records))]


def is_named_source(source: str) -> bool:
    """builtin:NAME and bigbench:TASK name data that is not a path."""
    return source.startswith(("builtin:", "bigbench:"))


def read_records(source: str) -> list[dict]:
    """The records of `source` (a file, a save_to_disk dir, builtin:NAME or bigbench:TASK[:SPLIT])."""
    if source.startswith("builtin:"):
        return _builtin(source.removeprefix("builtin:"))
    if source.startswith("bigbench:"):
        records = _bigbench(source.removeprefix("bigbench:"))
        if not records:
            raise UsageError(f"{source}: no records")
        return records
    path = Path(source)
    if path.is_dir():
        records = _read_saved_dataset(path)
    elif not path.is_file():
        where = "" if path.is_absolute() else f" (looked in {Path.cwd()}: relative paths are taken from the working directory)"
        raise UsageError(f"{path}: data file not found{where}")
    elif path.suffix.lower() not in READERS:
        raise UsageError(f"{path}: unknown data format '{path.suffix}' "
                         f"(expected {', '.join(READERS)}, or a save_to_disk directory)")
    else:
        records = READERS[path.suffix.lower()](path)
    if not records:
        raise UsageError(f"{path}: no records")
    return records
