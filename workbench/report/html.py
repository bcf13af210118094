"""`workbench report`: a static HTML page and a Markdown file comparing tuned adapters with their
base, built from results files (`workbench eval`) and run records (`workbench train`).

    out/index.html   self-contained: plots embedded as PNG data URIs, plain CSS, no JavaScript
    out/report.md    the same tables, plots referenced as plots/*.png
    out/plots/*.png

Every file is written atomically, index.html last, so a killed report leaves the previous page.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment

from workbench.errors import UsageError
from workbench.formats.results import KIND, load_results
from workbench.io import atomic_path
from workbench.report.plots import (
    FORGETTING, MC_RETENTION, Entry, finite, interval, loss_figure, reliability_figure, roc_figure, save,
    tradeoff_figure, value
)

MISSING = "—"
NOTHING = "adapter changes nothing"
# (header, metric, signed, with CI)
SUMMARY = [
    ("val loss", "learning.val_loss.tuned", False, False),
    ("exact match", "learning.exact_match.tuned", False, False),
    ("ppl ratio [CI]", "retention.general.ppl.ratio", False, True),
    ("KL", "retention.general.kl", False, False),
    ("mc acc Δ [CI]", "retention.mc.all.acc.delta", True, True),
    ("MIA AUC (loss)", "overfitting.mia.loss.auc", False, False),
    ("ECE tuned", "calibration.all.ece.tuned", False, False),
]


@dataclass
class Run:
    label: str
    path: Path  # the run directory
    record: dict


@dataclass
class Plot:
    title: str
    file: str  # relative to the report directory
    uri: str  # the PNG as a data URI


# --- public API --------------------------------------------------------------------------------


def build_report(inputs: list[str | Path], out: str | Path) -> Path:
    """Write out/index.html, out/report.md and out/plots/; returns the path of index.html.

    inputs: run directories, run.json files and results.json files, in any mix. Runs named by a
    results entry's "run" field are added when their run.json exists.
    """
    out = _out_dir(out)
    entries, runs, sources = load_inputs(inputs)
    plots = PlotDir(out / "plots")
    context = {
        "title": "Workbench report", "sources": sources, "nothing": NOTHING,
        "why": "the adapter's delta is exactly zero, so its scores are the base's",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "flagged": [e.name for e in entries if e.data.get("changes_model") is False],
        "summary": summary_rows(entries), "tradeoff": _tradeoff_plots(entries, plots),
        "runs": [_run_context(run, plots) for run in runs],
        "entries": [_entry_context(e, plots) for e in entries],
    }
    _write_text(out / "report.md", _MARKDOWN.render(**context))
    _write_text(out / "index.html", _HTML.render(**context))
    plots.remove_stale()
    return out / "index.html"


def summary_table(results: dict) -> str:
    """The summary table of one results dict as fixed-width text, for a terminal."""
    entries = [Entry(e["name"], e, sweep=e["name"].split("@")[0]) for e in results["entries"]]
    headers, rows = summary_rows(entries)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def summary_rows(entries: list[Entry]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the summary: one row per entry, cells already formatted."""
    headers = ["entry", "scale"] + [h for h, *_ in SUMMARY] + ["changes model"]
    rows = [[e.name, fmt_scale(e)] + [metric_cell(e, *spec) for _, *spec in SUMMARY] + [_changes(e)]
            for e in entries]
    return headers, rows


# --- formatting --------------------------------------------------------------------------------


def fmt(v, signed: bool = False) -> str:
    """3 decimals in the usual range, 3 significant digits outside it; None or NaN is a dash."""
    if not finite(v):
        return MISSING
    spec = ".3f" if v == 0 or 1e-3 <= abs(v) < 1e4 else ".3g"
    return format(v, ("+" if signed else "") + spec)


def metric_cell(entry: Entry, name: str, signed: bool = False, with_ci: bool = True) -> str:
    v = value(entry, name)
    if v is None:
        return MISSING
    ci = interval(entry, name) if with_ci else None
    return fmt(v, signed) + (f" [{fmt(ci[0], signed)}, {fmt(ci[1], signed)}]" if ci else "")


def _ci_cell(entry: Entry, name: str) -> str:
    ci = interval(entry, name)
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else MISSING


def fmt_scale(entry: Entry) -> str:
    scale = entry.data.get("scale")
    return f"{scale:g}" if finite(scale) else MISSING


def _changes(entry: Entry) -> str:
    changes = entry.data.get("changes_model")
    return {True: "yes", False: f"NO: {NOTHING}"}.get(changes, MISSING)


# --- inputs ------------------------------------------------------------------------------------


def load_inputs(inputs: list[str | Path]) -> tuple[list[Entry], list[Run], list[dict]]:
    """(entries merged across results files, runs, one summary dict per results file)."""
    if not inputs:
        raise UsageError("report: name at least one run directory, run.json or results.json")
    results, runs = {}, Runs()
    for raw in inputs:
        path = Path(raw)
        kind, payload = _read_input(path)
        if kind == "results":
            results.setdefault(path.resolve(), (path, payload))  # the same file twice counts once
        else:
            runs.add(path if path.is_dir() else path.parent, payload)
    entries = merge_entries(list(results.values()))
    for entry in entries:
        entry.run = runs.find(entry)
    return entries, runs.runs, [_source(path, r) for path, r in results.values()]


def _read_input(path: Path) -> tuple[str, dict]:
    if path.is_dir():
        if not (path / "run.json").is_file():
            raise UsageError(f"{path}: no run.json in this directory")
        path = path / "run.json"
    elif not path.is_file():
        raise UsageError(f"{path}: not found")
    data = _read_json(path)
    if isinstance(data, dict) and data.get("kind") == KIND:
        return "results", load_results(path)
    if _is_run(data):
        return "run", data
    raise UsageError(f"{path}: neither a run.json nor a workbench results file")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not a JSON file ({exc})") from None


def _is_run(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("recipe"), dict) and "status" in data


def merge_entries(results: list[tuple[Path, dict]]) -> list[Entry]:
    """Entries of every file in order; a name already taken is prefixed with its file's stem."""
    entries, taken = [], set()
    for path, result in results:
        for data in result["entries"]:
            name = data["name"]
            if name in taken:
                name = _unique(f"{path.stem}:{name}", taken)
            taken.add(name)
            sweep = f"{path}\0{data['name'].split('@')[0]}"
            entries.append(Entry(name, data, sweep, source=path))
    return entries


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}#{n}"
    return candidate


def _source(path: Path, results: dict) -> dict:
    suite, base = results.get("suite"), results.get("base")
    suite = suite.get("name") if isinstance(suite, dict) else None
    base = base.get("model") if isinstance(base, dict) else None
    meta = (f"suite {suite or '?'}, base {base or '?'}, {len(results['entries'])} entries, "
            f"created {results.get('created') or '?'}")
    return {"path": str(path), "meta": meta}


class Runs:
    """The runs of a report, one per run directory, in the order first met."""

    def __init__(self):
        self.runs: list[Run] = []
        self._by_path: dict[Path, Run] = {}

    def add(self, run_dir: Path, record: dict, label: str | None = None) -> Run:
        key = run_dir.resolve()
        if key not in self._by_path:
            label = label or (str(run_dir) if run_dir.name else key.name)
            label = _unique(label, {r.label for r in self.runs})
            self._by_path[key] = Run(label, run_dir, record)
            self.runs.append(self._by_path[key])
        return self._by_path[key]

    def find(self, entry: Entry) -> str | None:
        """The label of the entry's run, loading it when its run.json exists (quietly skipped
        when it does not or does not parse: the report is still useful without its curves)."""
        named = entry.data.get("run")
        if not isinstance(named, str) or not named:
            return None
        candidates = [Path(named)] + ([entry.source.parent / named] if entry.source else [])
        for run_dir in candidates:
            if run_dir.resolve() in self._by_path:
                return self._by_path[run_dir.resolve()].label
            try:
                record = json.loads((run_dir / "run.json").read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if _is_run(record):
                return self.add(run_dir, record, label=named).label
        return None


# --- plots and page ----------------------------------------------------------------------------


class PlotDir:
    """Saves figures as uniquely named PNGs in one directory and remembers what it wrote."""

    def __init__(self, root: Path):
        self.root = root
        self.written: list[Path] = []

    def save(self, fig, stem: str, title: str) -> Plot | None:
        if fig is None:
            return None
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "plot"
        path, n = self.root / f"{slug}.png", 1
        while path in self.written:
            n += 1
            path = self.root / f"{slug}-{n}.png"
        save(fig, path)
        self.written.append(path)
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return Plot(title, f"{self.root.name}/{path.name}", uri)

    def remove_stale(self) -> None:
        """Drop PNGs a previous report left that this one does not reference."""
        for path in self.root.glob("*.png"):
            if path not in self.written:
                path.unlink(missing_ok=True)


def _tradeoff_plots(entries: list[Entry], plots: PlotDir) -> list[Plot]:
    forgetting = next((x for x in FORGETTING if any(value(e, x[0]) is not None for e in entries)), None)
    made = [plots.save(tradeoff_figure(entries, forgetting), "tradeoff", "Learning vs forgetting")
            if forgetting else None,
            plots.save(tradeoff_figure(entries, MC_RETENTION), "tradeoff-mc",
                       "Learning vs multiple-choice retention")]
    return [p for p in made if p]


def _run_context(run: Run, plots: PlotDir) -> dict:
    record = run.record
    final = record.get("final") if isinstance(record.get("final"), dict) else {}
    penalties = ", ".join(p for p in record.get("penalties") or [] if isinstance(p, str)) or "none"
    meta = (f"recipe {record['recipe'].get('name')}; penalties: {penalties}; status {record.get('status')}; "
            f"{record.get('global_step', '?')} steps; final eval loss {fmt(final.get('eval_loss'))}")
    return {"label": run.label, "meta": meta,
            "plot": plots.save(loss_figure(run.label, record), f"loss-{run.path.resolve().name}",
                               f"Training losses: {run.label}")}


def _entry_context(entry: Entry, plots: PlotDir) -> dict:
    metrics = entry.data["metrics"]
    rows = [(name, metric_cell(entry, name, with_ci=False), _ci_cell(entry, name))
            for name in sorted(metrics)]
    meta = (f"adapter {entry.data.get('adapter') or '?'}; scale {fmt_scale(entry)}; "
            f"run {entry.run or entry.data.get('run') or MISSING}; from {entry.source or '?'}")
    return {"name": entry.name, "meta": meta,
            "nothing": entry.data.get("changes_model") is False, "metrics": rows,
            "plots": [p for p in _entry_plots(entry, plots) if p]}


def _entry_plots(entry: Entry, plots: PlotDir) -> list[Plot | None]:
    curves = entry.data.get("curves") if isinstance(entry.data.get("curves"), dict) else {}
    tasks = [k.split(".")[1] for k in curves
             if k.startswith("calibration.") and k.endswith(".reliability")]
    task = "all" if "all" in tasks else (tasks[0] if tasks else None)
    made = []
    if task:
        ece = {s: value(entry, f"calibration.{task}.ece.{s}") for s in ("base", "tuned")}
        title = f"Reliability ({task}): {entry.name}"
        made.append(plots.save(reliability_figure(title, curves[f"calibration.{task}.reliability"], ece),
                               f"reliability-{entry.name}", title))
    prefix, suffix = "overfitting.mia.", ".roc"
    rocs = {k[len(prefix):-len(suffix)]: c for k, c in curves.items()
            if k.startswith(prefix) and k.endswith(suffix)}
    if rocs:
        aucs = {s: value(entry, f"{prefix}{s}.auc") for s in rocs}
        title = f"Membership inference ROC: {entry.name}"
        made.append(plots.save(roc_figure(title, rocs, aucs), f"roc-{entry.name}", title))
    return made


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _out_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    return out


# --- templates ---------------------------------------------------------------------------------

_HTML = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
th:first-child, td:first-child { text-align: left; }
tr.nothing td { background: #fff3cd; }
.flag { color: #8a4b00; font-weight: 600; }
.meta { color: #666; font-size: 0.9em; }
img { max-width: 100%; height: auto; }
figure { margin: 1em 0; }
figcaption { color: #555; font-size: 0.9em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">generated {{ created }}</p>
{% macro figure(plot) %}
<figure><img src="{{ plot.uri }}" alt="{{ plot.title }}"><figcaption>{{ plot.title }} ({{ plot.file }})</figcaption></figure>
{% endmacro %}
{% if sources %}
<h2>Inputs</h2>
<ul>
{% for s in sources %}
<li><code>{{ s.path }}</code>: {{ s.meta }}</li>
{% endfor %}
</ul>
{% endif %}
{% if flagged %}
<p class="flag">{{ nothing }}: {{ flagged | join(", ") }} ({{ why }})</p>
{% endif %}
{% if summary[1] %}
<h2>Summary</h2>
<table>
<tr>{% for h in summary[0] %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in summary[1] %}
<tr{% if row[0] in flagged %} class="nothing"{% endif %}>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}
</table>
{% endif %}
{% if tradeoff %}
<h2>Learning vs forgetting</h2>
{% for plot in tradeoff %}{{ figure(plot) }}{% endfor %}
{% endif %}
{% if runs %}
<h2>Training runs</h2>
{% for run in runs %}
<h3>{{ run.label }}</h3>
<p class="meta">{{ run.meta }}</p>
{% if run.plot %}{{ figure(run.plot) }}{% else %}<p>no loss history recorded</p>{% endif %}
{% endfor %}
{% endif %}
{% if entries %}
<h2>Entries</h2>
{% for e in entries %}
<h3>{{ e.name }}</h3>
{% if e.nothing %}<p class="flag">{{ nothing }}</p>{% endif %}
<p class="meta">{{ e.meta }}</p>
{% for plot in e.plots %}{{ figure(plot) }}{% endfor %}
<details><summary>all {{ e.metrics | length }} metrics</summary>
<table>
<tr><th>metric</th><th>value</th><th>95% CI</th></tr>
{% for name, value, ci in e.metrics %}
<tr><td>{{ name }}</td><td>{{ value }}</td><td>{{ ci }}</td></tr>
{% endfor %}
</table>
</details>
{% endfor %}
{% endif %}
</body>
</html>
""")

_MARKDOWN_ENV = Environment(autoescape=False, trim_blocks=True, lstrip_blocks=True)
_MARKDOWN_ENV.filters["cell"] = lambda text: str(text).replace("|", "\\|")
_MARKDOWN = _MARKDOWN_ENV.from_string("""\
# {{ title }}

generated {{ created }}

{% for s in sources %}
- `{{ s.path }}`: {{ s.meta }}
{% endfor %}
{% if flagged %}

**{{ nothing }}**: {{ flagged | join(", ") }} ({{ why }})
{% endif %}
{% if summary[1] %}

## Summary

| {{ summary[0] | map("cell") | join(" | ") }} |
|{% for h in summary[0] %}{{ "---|" if loop.first else "---:|" }}{% endfor %}

{% for row in summary[1] %}
| {{ row | map("cell") | join(" | ") }} |
{% endfor %}
{% endif %}
{% if tradeoff %}

## Learning vs forgetting

{% for plot in tradeoff %}
![{{ plot.title }}]({{ plot.file }})

{% endfor %}
{% endif %}
{% if runs %}

## Training runs
{% for run in runs %}

### {{ run.label }}

{{ run.meta }}

{% if run.plot %}
![{{ run.plot.title }}]({{ run.plot.file }})
{% else %}
no loss history recorded
{% endif %}
{% endfor %}
{% endif %}
{% if entries %}

## Entries
{% for e in entries %}

### {{ e.name }}

{% if e.nothing %}
**{{ nothing }}**

{% endif %}
{{ e.meta }}

{% for plot in e.plots %}
![{{ plot.title }}]({{ plot.file }})

{% endfor %}
| metric | value | 95% CI |
|---|---:|---:|
{% for name, value, ci in e.metrics %}
| {{ name | cell }} | {{ value }} | {{ ci }} |
{% endfor %}
{% endfor %}
{% endif %}
""")
