"""What a report is built from: results files (`workbench eval`), run records (`workbench train`)
and compare.json files (`workbench compare --out`), given in any mix, merged into one list of
entries, one list of runs and the comparisons.

A run named by a results entry's "run" field is added when its run.json exists; run records are
read through `read_run`, results files through `load_results`, so a bad input is one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workbench.errors import UsageError
from workbench.formats.comparison import KIND as COMPARE_KIND, Comparison, read_comparison
from workbench.formats.results import KIND, Results, load_results
from workbench.io import read_json
from workbench.formats.run_record import FILENAME, RunRecord, read_run
from workbench.report.plots import ReportEntry


@dataclass
class Run:
    label: str
    path: Path  # the run directory
    record: RunRecord


@dataclass
class Inputs:
    entries: list[ReportEntry]       # merged across results files
    runs: list[Run]
    results: list[Path]              # the results files, each once, in the order given
    comparisons: list[tuple[Path, Comparison]]   # compare.json files, each once
    sources: list[dict]              # one summary per results or compare file, for the page


def load_inputs(inputs: list[str | Path]) -> Inputs:
    """Every input read, checked and sorted by kind; a bad one is a one-line UsageError."""
    if not inputs:
        raise UsageError("report: name at least one run directory, run.json, results.json or compare.json")
    results, comparisons, runs = {}, {}, Runs()
    for raw in inputs:
        path = Path(raw)
        payload = _read_input(path)
        if isinstance(payload, RunRecord):
            runs.add(path if path.is_dir() else path.parent, payload)
        elif isinstance(payload, Results):
            results.setdefault(path.resolve(), (path, payload))  # the same file twice counts once
        else:
            comparisons.setdefault(path.resolve(), (path, payload))
    entries = merge_entries(list(results.values()))
    for entry in entries:
        entry.run = runs.find(entry)
    sources = [_source(path, r) for path, r in results.values()]
    sources += [_compare_source(path, c) for path, c in comparisons.values()]
    return Inputs(entries, runs.runs, [p for p, _ in results.values()], list(comparisons.values()), sources)


def _read_input(path: Path) -> Results | Comparison | RunRecord:
    """A results dict or a run record: which one, the file's JSON says."""
    if path.is_dir():
        if not (path / FILENAME).is_file():
            raise UsageError(f"{path}: no {FILENAME} in this directory")
        path = path / FILENAME
    elif not path.is_file():
        raise UsageError(f"{path}: not found")
    data = _read_json(path)
    if isinstance(data, dict) and data.get("kind") == KIND:
        return load_results(path)
    if isinstance(data, dict) and data.get("kind") == COMPARE_KIND:
        return read_comparison(path, "this report", data)
    if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
        return read_run(path)
    raise UsageError(f"{path}: neither a run.json, a workbench results file nor a compare.json")


def _read_json(path: Path):
    return read_json(path, "JSON file")


def merge_entries(results: list[tuple[Path, Results]]) -> list[ReportEntry]:
    """Entries of every file in order; a name already taken is prefixed with its file's stem."""
    entries, taken = [], set()
    for path, result in results:
        for entry in result.entries:
            name = entry.name
            if name in taken:
                name = _unique(f"{path.stem}:{name}", taken)
            taken.add(name)
            entries.append(ReportEntry(name, entry))
    return entries


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}#{n}"
    return candidate


def _source(path: Path, results: Results) -> dict:
    suite, base = results.suite.get("name"), results.base.get("model")
    meta = (f"suite {suite or '?'}, base {base or '?'}, {len(results.entries)} entries, "
            f"created {results.created or '?'}")
    return {"path": str(path), "meta": meta}


def _compare_source(path: Path, data: Comparison) -> dict:
    meta = (f"matched-learning comparison against {data.reference.family}, {len(data.families)} "
            f"families, created {data.created or '?'}")
    return {"path": str(path), "meta": meta}


class Runs:
    """The runs of a report, one per run directory, in the order first met."""

    def __init__(self):
        self.runs: list[Run] = []
        self._by_path: dict[Path, Run] = {}

    def add(self, run_dir: Path, record: RunRecord, label: str | None = None) -> Run:
        key = run_dir.resolve()
        if key not in self._by_path:
            label = label or (str(run_dir) if run_dir.name else key.name)
            label = _unique(label, {r.label for r in self.runs})
            self._by_path[key] = Run(label, run_dir, record)
            self.runs.append(self._by_path[key])
        return self._by_path[key]

    def find(self, entry: ReportEntry) -> str | None:
        """The label of the entry's run, loading it when its run.json exists (quietly skipped
        when it does not or does not parse: the report is still useful without its curves)."""
        named = entry.entry.run
        if not isinstance(named, str) or not named:
            return None
        candidates = [Path(named)] + ([entry.source.parent / named] if entry.source else [])
        for run_dir in candidates:
            if run_dir.resolve() in self._by_path:
                return self._by_path[run_dir.resolve()].label
            try:
                record = read_run(run_dir / FILENAME)
            except UsageError:
                continue
            return self.add(run_dir, record, label=named).label
        return None
