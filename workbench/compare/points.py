"""results.json entries as families of points on the (learning, forgetting) plane.

Entries from several results files are merged. An entry's family is its recipe (`family`, or in
files that predate it the name before "@" or ":": `kl@0.5`, `kl:step20` -> `kl`), its seed `seed` (default 0). A
family's points are all its entries: adapter scales, checkpoints, strengths and seeds alike.

Every problem with the inputs is a one-line UsageError naming the file or the flag: metric names
outside the catalogue (or without a direction), a learning or forgetting metric missing from
entries, no reference family, a family or seed with one point, files from different suites.
A light entry (a trajectory point scored on learning and general text only, `"light": true`)
is a point only for the metrics it carries.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from workbench.compare.frontier import Point, se_from_ci
from workbench.config.suggest import did_you_mean
from workbench.errors import UsageError
from workbench.formats import metrics as catalogue
from workbench.formats.results import Entry, load_results

DEFAULT_LEARNING = "learning.val_loss.tuned"
DEFAULT_FORGETTING = ("retention.general.ppl.ratio", "retention.general.kl")
MC_DELTA = re.compile(r"retention\.mc\.[^.]+\.acc\.delta")  # every task's accuracy delta joins the defaults
DEFAULT_REFERENCE = "baseline"
SHOWN = 5  # names listed in an error line before "and N more"


class BasePoint(Entry):
    """The base model (adapter scale 0) as a point of a family: see `with_base_point`."""


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def files(entries: Sequence[Entry]) -> str:
    """The distinct files the entries came from, for the start of an error line."""
    return ", ".join(dict.fromkeys(str(e.source or "-") for e in entries))


def read_entries(paths: Sequence[str | Path]) -> list[Entry]:
    """Every entry of every file, in order. Files must come from one suite and one base model
    where they record fingerprints: points scored on different items are not comparable."""
    entries: list[Entry] = []
    seen: dict[str, tuple[Path, str]] = {}
    for path in map(Path, paths):
        results = load_results(path)
        for key, section in (("suite", "suite"), ("base", "base model")):
            mark = results.fingerprint(key)
            if mark is None:
                continue
            first = seen.setdefault(key, (path, mark))
            if first[1] != mark:
                raise UsageError(f"{path}: {section} fingerprint {mark} differs from {first[0]}'s "
                                 f"{first[1]}; compare reads results of one suite on one base")
        entries += results.entries
    return entries


def direction(metric: str, flag: str) -> bool:
    """higher_is_better for a metric named on the command line, or a UsageError naming the flag:
    the name must be in the catalogue and have a direction."""
    if not catalogue.is_metric(metric):
        hint = did_you_mean(metric, catalogue.examples(), cutoff=0.5)
        raise UsageError(f"{flag}: {metric!r} is not a results.json metric{hint}; see docs/results.md")
    higher = catalogue.higher_is_better(metric)
    if higher is None:
        raise UsageError(f"{flag}: {metric} has no better direction in the catalogue, so "
                         "'forgets less' or 'learns more' means nothing for it")
    return higher


def reading(entry: Entry, metric: str) -> tuple[float, float, bool] | None:
    """(value, se, value_only) of a metric in an entry, or None when it is absent or non-finite.
    se comes from the CI (`se_from_ci`); a value with no CI has se 0 and value_only True."""
    value, ci = entry.value(metric), entry.interval(metric)
    if value is None:
        return None
    return (value, se_from_ci(*ci), False) if ci else (value, 0.0, True)


def full(entries: Sequence[Entry]) -> list[Entry]:
    """The entries scored on the whole suite (not light trajectory points), which must carry every
    forgetting metric compared; all of them when every entry is light."""
    return [e for e in entries if not e.light] or list(entries)


def carrying(members: Sequence[Entry], metric: str) -> list[Entry]:
    """The entries that are points for `metric`: a light entry lacking it is no point on its front."""
    return [e for e in members if reading(e, metric) is not None]


def require(entries: Sequence[Entry], metric: str, flag: str) -> None:
    """Every entry must carry `metric` with a finite value; else one line naming the file(s) and
    the entries without it."""
    missing = [e for e in entries if reading(e, metric) is None]
    if missing:
        raise UsageError(f"{files(missing)}: {flag} {metric} is missing or non-finite in "
                         f"{len(missing)} of {len(entries)} entries: {_listed([e.name for e in missing])}")


def default_forgetting(entries: Sequence[Entry]) -> tuple[list[str], list[str]]:
    """(used, skipped): the default forgetting metrics - the general-text perplexity ratio and KL
    and every multiple-choice accuracy delta - that every full (not light) entry carries, and those
    some lack (left out rather than refused: defaults are a convenience, --forgetting is a request)."""
    entries = full(entries)
    present = dict.fromkeys(m for e in entries for m in e.metrics)
    candidates = [*DEFAULT_FORGETTING, *sorted(m for m in present if MC_DELTA.fullmatch(m))]
    used = [m for m in candidates if all(reading(e, m) is not None for e in entries)]
    skipped = [m for m in candidates if m in present and m not in used]
    if not used:
        raise UsageError(f"{files(entries)}: no default forgetting metric ({', '.join(DEFAULT_FORGETTING)}, "
                         "retention.mc.<task>.acc.delta) is in every entry; name some with --forgetting")
    return used, skipped


def families(entries: Sequence[Entry]) -> dict[str, dict[int, list[Entry]]]:
    """family -> seed -> entries, in the order they first appear; an entry without a seed (a file
    before seeds, a bare adapter) is seed 0."""
    grouped: dict[str, dict[int, list[Entry]]] = {}
    for e in entries:
        grouped.setdefault(e.family, {}).setdefault(e.seed or 0, []).append(e)
    return grouped


def pick_reference(grouped: dict[str, dict[int, list[Entry]]], reference: str | None,
                   entries: Sequence[Entry]) -> str:
    """The reference family: --reference, else one named 'baseline'; one line when absent, with
    the families there are and the closest name."""
    known = ", ".join(grouped)
    if reference is None:
        if DEFAULT_REFERENCE in grouped:
            return DEFAULT_REFERENCE
        hint = did_you_mean(DEFAULT_REFERENCE, grouped, cutoff=0.5)
        raise UsageError(f"{files(entries)}: no family named {DEFAULT_REFERENCE!r} to compare against{hint}; "
                         f"pass --reference FAMILY (families: {known})")
    if reference not in grouped:
        hint = did_you_mean(reference, grouped, cutoff=0.5)
        raise UsageError(f"--reference: no family {reference!r} in {files(entries)}{hint} (families: {known})")
    return reference


def check_fronts(grouped: dict[str, dict[int, list[Entry]]]) -> None:
    """Each seed of each family needs two or more points: one point draws no front."""
    for family, seeds in grouped.items():
        for seed, members in seeds.items():
            if len(members) < 2:
                which = f"family {family!r}" if len(seeds) == 1 else f"family {family!r} seed {seed}"
                raise UsageError(f"{members[0].source}: {which} has one point ({members[0].name}); a front "
                                 "needs two or more: evaluate its adapter scales or checkpoints too")


# What the base scores against itself, by the end of a metric's name: a ratio of 1, a change of 0.
_SELF = {"ratio": 1.0, "delta": 0.0, "kl": 0.0, "kl_upper": 0.0, "top1_agreement": 1.0}


def base_reading(entry: Entry, metric: str) -> float | None:
    """The base model's value of `metric` (adapter scale 0), read from an entry of its eval: a
    `.tuned` metric's `.base` sibling, 1 for a ratio, 0 for a change or a KL; None when unknown."""
    stem, _, last = metric.rpartition(".")
    return entry.value(f"{stem}.base") if last == "tuned" else _SELF.get(last)


def with_base_point(grouped: dict[str, dict[int, list[Entry]]], metrics: Sequence[str]
                    ) -> dict[str, dict[int, list[Entry]]]:
    """Every family and seed with the base added as a point: any adapter scaled to 0 is the base,
    exactly, so the base is on every family's curve for free and every front reaches it. A point
    whose metrics are known without noise (a CI of zero width); left out when a metric has no
    base value (say, an overfitting metric). It carries the first member's items, whose base side
    gives the base's learning on a resample (`items.Resample.base_values`)."""
    out: dict[str, dict[int, list[Entry]]] = {}
    for family, seeds in grouped.items():
        out[family] = {}
        for seed, members in seeds.items():
            values = {m: base_reading(members[0], m) for m in metrics}
            base = [] if None in values.values() else [BasePoint(
                name="base", family=family, seed=seed, step=0, scale=0.0, items=members[0].items,
                metrics={m: {"value": v, "ci": [v, v]} for m, v in values.items()}).read_from(members[0].source)]
            out[family][seed] = [*members, *base]
    return out


def learning_span(members: Sequence[Entry], learning: str, higher: bool) -> tuple[float, float]:
    """(min, max) learning cost over the entries (negated when higher is better)."""
    costs = [-reading(e, learning)[0] if higher else reading(e, learning)[0] for e in members]
    return min(costs), max(costs)


def to_points(members: Sequence[Entry], learning: str, learning_higher: bool,
              forgetting: str, forgetting_higher: bool) -> list[Point]:
    """The entries as cost points: each metric negated when higher is better, so lower is better
    on both axes (see workbench.compare.frontier). The metrics are checked present beforehand.

    Learning is taken as measured (se 0), whatever its CI. Every point is scored on the same
    held-out examples, so item noise moves all of them together and largely cancels in a
    difference at matched learning; read as independent noise per point, carried through a
    steep stretch of a front, it swamped the forgetting noise (the study's CIs grew up to tenfold).
    Seed noise in learning still counts: each seed has its own front."""
    points = []
    for e in members:
        x = reading(e, learning)[0]
        y, sy, y_only = reading(e, forgetting)
        points.append(Point(-x if learning_higher else x, -y if forgetting_higher else y,
                            0.0, sy, e.name, y_only))
    return points
