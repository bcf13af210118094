"""The release gate: check a results.json against a policy of thresholds; exit 1 when one is crossed.

A policy is YAML (see evals/gates/release.yaml):

    name: release
    entries: all                 # or [name or glob, ...]; default: scale == 1.0, not light
    rules:
      - metric: retention.mc.all.acc.delta   # a metric name (docs/results.md), or an fnmatch glob
        min: -0.01                           # at least one of min / max; both bounds inclusive
        at: ci_low                           # value (default) | ci_low | ci_high
        missing: fail                        # fail (default) | skip
        why: retention accuracy drop <= 1 point at the 95% CI bound

Every (selected entry, rule, matching metric) is one `Check` with a status:
pass (within bounds), fail (outside, or the value is None: non-finite), missing (no metric
matches and the rule says `missing: fail`) or skipped (no metric matches, `missing: skip`).
The gate passes when every check is pass or skipped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

from pydantic import (BaseModel, ConfigDict, FiniteFloat, PrivateAttr, ValidationError,
                      field_validator, model_validator)
from rich import box
from rich.console import Console
from rich.table import Table

from workbench.errors import UsageError
from workbench.formats.results import Entry, Results, load_results
from workbench.config.suggest import did_you_mean
from workbench.config.yamlfile import describe_error, read_yaml
from workbench.formats import metrics as catalogue

Status = Literal["pass", "fail", "missing", "skipped"]
OK_STATUSES = ("pass", "skipped")


class Rule(BaseModel):
    """One threshold on one metric (or on every metric a glob matches)."""

    model_config = ConfigDict(extra="forbid")

    metric: str
    min: FiniteFloat | None = None
    max: FiniteFloat | None = None
    at: Literal["value", "ci_low", "ci_high"] = "value"
    missing: Literal["fail", "skip"] = "fail"
    why: str = ""

    @field_validator("metric")
    @classmethod
    def _not_blank(cls, metric: str) -> str:
        if not metric.strip():
            raise ValueError("metric name is empty")
        return metric.strip()

    @model_validator(mode="after")
    def _bounds(self) -> "Rule":
        if self.min is None and self.max is None:
            raise ValueError(f"rule on {self.metric} needs min or max (or both)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self

    @property
    def threshold(self) -> str:
        """The bound as text: '<= 1.05', '>= -0.01' or 'in [0, 1]'."""
        if self.min is not None and self.max is not None:
            return f"in [{self.min:g}, {self.max:g}]"
        return f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"

    def label(self, metric: str | None = None) -> str:
        """The metric (default: the rule's pattern) with the CI bound it is read at, if not value."""
        metric = metric or self.metric
        return metric if self.at == "value" else f"{metric}[{self.at}]"

    def admits(self, x: float) -> bool:
        return (self.min is None or x >= self.min) and (self.max is None or x <= self.max)


class Policy(BaseModel):
    """A named list of rules and the results entries they apply to."""

    model_config = ConfigDict(extra="forbid")

    name: str = "gate"
    description: str = ""
    entries: list[str] | None = None  # None: entries with scale == 1.0; ["*"]: all
    rules: list[Rule]
    _source: str = PrivateAttr(default="policy")

    @field_validator("entries", mode="before")
    @classmethod
    def _all_or_list(cls, entries):
        if entries == "all":
            return ["*"]
        if entries == []:
            raise ValueError("empty list: write 'all', name entries, or leave the key out "
                             "for the entries with scale 1.0")
        return [entries] if isinstance(entries, str) else entries

    @field_validator("rules")
    @classmethod
    def _some_rules(cls, rules: list[Rule]) -> list[Rule]:
        if not rules:
            raise ValueError("a policy needs at least one rule")
        return rules

    @property
    def source(self) -> str:
        """Where the policy came from (its file), for error messages."""
        return self._source


@dataclass(frozen=True)
class Check:
    """One rule applied to one metric of one entry."""

    entry: str
    rule: str              # the rule as written: "overfitting.mia.*.auc <= 0.6"
    metric: str            # the metric checked; the rule's pattern when nothing matched
    at: str                # value | ci_low | ci_high
    observed: float | None  # None when the metric is missing or non-finite
    threshold: str         # "<= 0.6"
    status: Status
    why: str = ""


# ---------------------------------------------------------------- loading


def _read_policy(path: Path) -> dict:
    data = read_yaml(path, kind="gate policy")
    if not data:
        raise UsageError(f"{path}: a gate policy must be a mapping with 'rules', got an empty file")
    return data


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file, or raise a one-line UsageError naming the file and key."""
    path = Path(path)
    data = _read_policy(path)
    data.setdefault("name", path.stem)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{path}: {describe_error(exc, Policy)}") from None
    for i, rule in enumerate(policy.rules):
        _check_catalogued(path, i, rule.metric)
    policy._source = str(path)
    return policy


def _check_catalogued(path: Path, index: int, metric: str) -> None:
    """A policy file's rule must be able to match a results.json metric: a typo would otherwise
    only show when the gate reports the metric missing, after an eval."""
    if catalogue.is_metric(metric) or any(fnmatchcase(name, metric) for name in catalogue.examples()):
        return
    hint = did_you_mean(metric, catalogue.examples(), cutoff=0.5)
    raise UsageError(f"{path}: rules[{index}].metric: {metric!r} matches no results.json metric{hint}; "
                     "see docs/results.md")


# ---------------------------------------------------------------- checking


def select_entries(results: Results, policy: Policy, names: list[str] | None = None) -> list[Entry]:
    """The entries to gate: `names` (e.g. from --entry) if given, else the policy's `entries`,
    else those with scale == 1.0 that are not light (the tuned adapters, not the scale sweep or
    the checkpoints scored on learning and general text only). Names may be globs; one that
    matches nothing is a UsageError."""
    entries = results.entries
    patterns, origin = (names, "--entry") if names else (policy.entries, f"{policy.source}: entries")
    if patterns is None:
        chosen = [e for e in entries if e.scale == 1.0 and not e.light]
        if not chosen:
            raise UsageError(f"{policy.source}: no entry has scale 1.0 and the whole suite; name entries in the "
                             "policy's `entries:` or with --entry")
        return chosen
    known = ", ".join(e.name for e in entries)
    for pattern in patterns:
        if not any(fnmatchcase(e.name, pattern) for e in entries):
            raise UsageError(f"{origin}: no entry matches {pattern!r} (results have: {known})")
    return [e for e in entries if any(fnmatchcase(e.name, p) for p in patterns)]


def _observed(entry: Entry, metric: str, rule: Rule, index: int, policy: Policy) -> float | None:
    """The number the rule reads: the value or a CI bound; None when non-finite."""
    if rule.at != "value" and entry.metrics[metric].ci is None:
        raise UsageError(f"{policy.source}: rules[{index}].at: {rule.at} needs a confidence "
                         f"interval, but {metric} has none (entry {entry.name!r})")
    return entry.value(metric, rule.at)


def _check_rule(entry: Entry, rule: Rule, index: int, policy: Policy) -> list[Check]:
    """The checks of one rule on one entry: one per matching metric, or one missing/skipped."""
    common = dict(entry=entry.name, rule=f"{rule.label()} {rule.threshold}", at=rule.at,
                  threshold=rule.threshold, why=rule.why)
    metrics = [m for m in entry.metrics if fnmatchcase(m, rule.metric)]
    if not metrics:
        status = "missing" if rule.missing == "fail" else "skipped"
        return [Check(metric=rule.metric, observed=None, status=status, **common)]
    checks = []
    for metric in metrics:
        x = _observed(entry, metric, rule, index, policy)
        status = "pass" if x is not None and rule.admits(x) else "fail"
        checks.append(Check(metric=metric, observed=x, status=status, **common))
    return checks


def check(results: Results | dict, policy: Policy, entries: list[str] | None = None) -> list[Check]:
    """Every rule of `policy` on every selected entry of `results` (a results file or its
    payload; see `select_entries`)."""
    return [c for entry in select_entries(Results.of(results), policy, entries)
            for i, rule in enumerate(policy.rules)
            for c in _check_rule(entry, rule, i, policy)]


def passed(checks: list[Check]) -> bool:
    """True when no check failed or went missing."""
    return all(c.status in OK_STATUSES for c in checks)


# ---------------------------------------------------------------- reporting


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _verdict(checks: list[Check], name: str) -> str:
    """One line: 'gate release: FAIL (2 of 14 checks failed: tiny: x.y = 1.07, not <= 1.05; ...)'."""
    bad = [c for c in checks if c.status not in OK_STATUSES]
    skipped = sum(c.status == "skipped" for c in checks)
    if not bad:
        n = len(checks) - skipped
        extra = f", {skipped} skipped" if skipped else ""
        return f"gate {name}: PASS ({n} check{'s' * (n != 1)} passed{extra})"
    shown = [f"{c.entry}: {c.metric} missing (the rule says missing: fail)" if c.status == "missing" else
             f"{c.entry}: {c.metric}{'' if c.at == 'value' else f'[{c.at}]'} = "
             f"{'non-finite' if c.observed is None else _number(c.observed)}, not {c.threshold}"
             for c in bad[:3]]
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    return (f"gate {name}: FAIL ({len(bad)} of {len(checks)} checks failed: "
            f"{'; '.join(shown)}{more})")


def format_table(checks: list[Check], name: str = "gate", width: int = 140) -> str:
    """A plain-text (ASCII, no colour) table of the checks, then the one-line verdict."""
    table = Table(box=box.ASCII2, show_edge=False, pad_edge=False)
    for column, justify in [("status", "left"), ("entry", "left"), ("metric", "left"),
                            ("observed", "right"), ("threshold", "left"), ("why", "left")]:
        table.add_column(column, justify=justify, overflow="fold")
    for c in checks:
        metric = c.metric if c.at == "value" else f"{c.metric}[{c.at}]"
        observed = "n/a" if c.observed is None and c.status == "fail" else _number(c.observed)
        table.add_row(c.status.upper(), c.entry, metric, observed, c.threshold, c.why)
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False, markup=False,
            highlight=False, emoji=False).print(table)
    lines = [line.rstrip() for line in out.getvalue().splitlines()]
    return "\n".join(lines + ["", _verdict(checks, name)])


GATE_SCHEMA_VERSION = 1
GATE_KIND = "workbench.gate"


def decision(checks: list[Check], policy: Policy, results_path: str | Path) -> dict:
    """The gate's outcome as data: what `--json` writes, the report shows and W&B logs
    (docs/evals.md, "The gate for CI"). Versioned like results.json."""
    entries: dict[str, bool] = {}
    for c in checks:
        entries[c.entry] = entries.get(c.entry, True) and c.status in OK_STATUSES
    return {
        "schema_version": GATE_SCHEMA_VERSION, "kind": GATE_KIND,
        "policy": {"name": policy.name, "path": policy.source}, "results": str(results_path),
        "passed": passed(checks), "verdict": _verdict(checks, policy.name),
        "counts": {status: sum(c.status == status for c in checks) for status in ("pass", "fail", "missing", "skipped")},
        "entries": entries,
        "checks": [{"entry": c.entry, "rule": c.rule, "metric": c.metric, "at": c.at, "observed": c.observed,
                    "threshold": c.threshold, "status": c.status, "why": c.why} for c in checks],
    }


def junit_xml(outcome: dict) -> str:
    """JUnit XML, which CI systems render as a test report: one testsuite for the policy, one
    testcase per check (classname the entry), a failure for fail and missing, skipped for skipped."""
    from xml.etree import ElementTree as ET

    counts = outcome["counts"]
    suite = ET.Element("testsuite", name=f"gate {outcome['policy']['name']}", tests=str(len(outcome["checks"])),
                       failures=str(counts["fail"] + counts["missing"]), skipped=str(counts["skipped"]), errors="0")
    for c in outcome["checks"]:
        metric = c["metric"] if c["at"] == "value" else f"{c['metric']}[{c['at']}]"
        case = ET.SubElement(suite, "testcase", classname=c["entry"], name=f"{metric} {c['threshold']}")
        observed = "non-finite" if c["observed"] is None else f"{c['observed']:.6g}"
        if c["status"] == "fail":
            ET.SubElement(case, "failure", message=f"{metric} = {observed}, not {c['threshold']}").text = c["why"]
        elif c["status"] == "missing":
            ET.SubElement(case, "failure", message=f"{metric} missing (rule: missing: fail)").text = c["why"]
        elif c["status"] == "skipped":
            ET.SubElement(case, "skipped", message=f"{metric} missing (rule: missing: skip)")
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


def run_gate(results_path: str | Path, policy_path: str | Path, entries: list[str] | None = None,
             json_out: str | Path | None = None, junit_out: str | Path | None = None,
             wandb: bool | None = None) -> int:
    """Print the gate table for a results file; 0 when it passes, 1 when it fails. `json_out`
    ("-" for standard output, in place of the table) and `junit_out` write the decision for CI.
    `wandb` (--wandb / --no-wandb; default: runs whose run.json names a W&B run) logs the decision
    per fine-tune (`tracking.gates`). Bad input (either file, an unknown entry) raises UsageError."""
    import json

    from workbench.io import atomic_path, write_json

    policy = load_policy(policy_path)
    results = load_results(results_path)
    checks = check(results, policy, entries)
    outcome = decision(checks, policy, results_path)
    if str(json_out) == "-":
        print(json.dumps(outcome, indent=2))
    else:
        print(format_table(checks, policy.name))
        if json_out is not None:
            write_json(json_out, outcome)
    if junit_out is not None:
        with atomic_path(junit_out) as tmp:
            tmp.write_text(junit_xml(outcome))
    if wandb is not False:  # after the decision is printed and written: tracking never delays it
        from workbench.tracking.gates import log_gate

        log_gate(results, results_path, policy, checks, force=wandb)
    return 0 if outcome["passed"] else 1
