"""Per-item scores (results.json schema 2, `entries[].items`) and the metrics recomputed from them.

An entry's items hold one component per kind of data, each a record of per-item columns and a
`key` that fingerprints the items (docs/results.md):

    general      tokens, base_nll, tuned_nll (summed over the chunk), kl, kl_upper,
                 top1_agreement (means over the chunk's tokens)       one value per chunk
    mc.<task>    acc_base, acc_tuned, acc_norm_base, acc_norm_tuned (0 or 1)   per item
    target       tokens, base_nll, tuned_nll; exact_match_base, exact_match_tuned (full entries)
                                                                      per held-out example

Every metric compare can resample is a function of column sums, so a resample is a vector of
counts c_i (how often item i was drawn; sum c_i = n) and each sum is c . column:

    val_loss.tuned = sum c_i nll_t,i / sum c_i tok_i        (tokens pooled, as `workbench eval`)
    ppl.ratio      = exp(sum c nll_t / sum c tok - sum c nll_b / sum c tok)
    kl             = sum c_i kl_i / n                       (a mean over chunks)
    mc.<task>.acc.delta = sum c (acc_t - acc_b) / n_task;   mc.all pools every task's counts

With B resamples the counts are a [B, n] matrix and every sum one matrix product, for every
entry at once. Entries whose component has the same key were scored on the same items in the
same order: they share one count matrix (paired), which is what makes two recipes' errors cancel
in a difference. Different keys (a run's own held-out split, which follows its seed) draw apart.
"""

from __future__ import annotations

import zlib
from typing import Callable, Sequence

import numpy as np

from workbench.formats.results import item_components

GENERAL = ("tokens", "base_nll", "tuned_nll", "kl", "kl_upper", "top1_agreement")
TARGET = ("tokens", "base_nll", "tuned_nll")
MC = ("acc_base", "acc_tuned", "acc_norm_base", "acc_norm_tuned")
SELF = {"ratio": 1.0, "delta": 0.0, "kl": 0.0, "kl_upper": 0.0, "top1_agreement": 1.0}  # the base vs itself

Sum = Callable[[str, str], np.ndarray]  # (component, column) -> sum over the (resampled) items


def components(items) -> dict[str, dict]:
    """An entry's usable components (`formats.results.item_components`), columns as float arrays."""
    return {name: {k: v if k == "key" else np.asarray(v, dtype=np.float64) for k, v in record.items()}
            for name, record in item_components(items).items()}


def needs(metric: str, present: dict[str, dict]) -> list[tuple[str, tuple[str, ...]]] | None:
    """The (component, columns) a metric is computed from, or None when it is not one compare can
    recompute from items (overfitting, calibration) or the entry lacks what it needs."""
    parts = metric.split(".")
    if metric.startswith(("learning.val_loss.", "learning.val_ppl.")):
        want = [("target", TARGET)]
    elif metric.startswith("learning.exact_match."):
        want = [("target", ("exact_match_base", "exact_match_tuned"))]
    elif metric.startswith("retention.general."):
        want = [("general", GENERAL)]
    elif len(parts) == 5 and parts[:2] == ["retention", "mc"] and parts[3] in ("acc", "acc_norm"):
        tasks = sorted(c for c in present if c.startswith("mc.")) if parts[2] == "all" else [f"mc.{parts[2]}"]
        want = [(t, MC) for t in tasks] or None
    else:
        return None
    if want is None or any(c not in present or any(col not in present[c] for col in cols) for c, cols in want):
        return None
    return want


def value(metric: str, total: Sum, n: Callable[[str], int], tasks: Sequence[str]):
    """The metric from column sums: `total(component, column)` (a float or a [B] array) and
    `n(component)` the number of items. `tasks` are the entry's mc components, for `mc.all`."""
    parts = metric.split(".")
    side = parts[-1]
    if metric.startswith(("learning.val_loss.", "learning.val_ppl.", "retention.general.ppl.")):
        component = "target" if parts[0] == "learning" else "general"
        tokens = total(component, "tokens")
        loss = {s: total(component, f"{s}_nll") / tokens for s in ("base", "tuned")}
        loss["delta"] = loss["ratio"] = loss["tuned"] - loss["base"]
        return loss[side] if parts[1] == "val_loss" else np.exp(loss[side])
    if metric.startswith("learning.exact_match."):
        mean = {s: total("target", f"exact_match_{s}") / n("target") for s in ("base", "tuned")}
        return mean["tuned"] - mean["base"] if side == "delta" else mean[side]
    if metric.startswith("retention.general."):
        return total("general", side) / n("general")
    score = parts[3]
    chosen = list(tasks) if parts[2] == "all" else [f"mc.{parts[2]}"]
    count = sum(n(t) for t in chosen)
    mean = {s: sum(total(t, f"{score}_{s}") for t in chosen) / count for s in ("base", "tuned")}
    return mean["tuned"] - mean["base"] if side == "delta" else mean[side]


def draw(seed: int, label: str, n: int, replicates: int) -> np.ndarray:
    """[replicates, n] item indices drawn with replacement: the resamples of one set of items.
    The generator is seeded by (seed, crc32(label)), so a set's draws do not depend on which
    other sets exist or the order they are met in."""
    rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
    return rng.integers(0, n, size=(replicates, n))


def counts(indices: np.ndarray) -> np.ndarray:
    """[B, n] how often each item was drawn in each resample, from [B, n] indices (one bincount)."""
    b, n = indices.shape
    flat = (indices + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


class Resample:
    """Metric values of many entries on B resamples of their items.

    items: one `entries[].items` mapping (or None) per entry. paired: entries whose component has
    the same key share one draw of that component's items; unpaired (a control), every entry
    draws its own. `values(i, metric)` is [B], or None when entry i cannot recompute it."""

    def __init__(self, items: Sequence, replicates: int, seed: int = 0, paired: bool = True):
        self.replicates, self.seed, self.paired = replicates, seed, paired
        self.present = [components(x) for x in items]
        self._groups: dict[tuple, list[int]] = {}  # (component, key[, entry]) -> entries
        for i, comps in enumerate(self.present):
            for name, record in comps.items():
                self._groups.setdefault(self._group(i, name), []).append(i)
        self._sums: dict[tuple, np.ndarray] = {}

    def _group(self, i: int, component: str) -> tuple:
        key = self.present[i][component]["key"]
        return (component, key) if self.paired else (component, key, i)

    def indices(self, i: int, component: str) -> np.ndarray:
        """The [B, n] item indices entry i's component is resampled with."""
        group = self._group(i, component)
        n = len(next(v for k, v in self.present[i][component].items() if k != "key"))
        return draw(self.seed, ":".join(map(str, group)), n, self.replicates)

    def _total(self, i: int, component: str, column: str) -> np.ndarray:
        group = self._group(i, component)
        if (group, column) not in self._sums:
            members = self._groups[group]
            weights = counts(self.indices(i, component))                            # [B, n]
            stacked = np.stack([self.present[j][component][column] for j in members])  # [E, n]
            self._sums[group, column] = weights @ stacked.T                           # [B, E]
        return self._sums[group, column][:, self._groups[group].index(i)]

    def _tasks(self, i: int) -> list[str]:
        return sorted(c for c in self.present[i] if c.startswith("mc."))

    def can(self, i: int, metric: str) -> bool:
        return needs(metric, self.present[i]) is not None

    def values(self, i: int, metric: str) -> np.ndarray | None:
        if not self.can(i, metric):
            return None
        comps = self.present[i]
        return np.asarray(value(metric, lambda c, col: self._total(i, c, col),
                                lambda c: len(comps[c][col_of(comps[c])]), self._tasks(i)), dtype=np.float64)

    def point(self, i: int, metric: str) -> float | None:
        """The metric on all items once each: what `workbench eval` stored, up to rounding."""
        if not self.can(i, metric):
            return None
        comps = self.present[i]
        return float(value(metric, lambda c, col: comps[c][col].sum(), lambda c: len(comps[c][col_of(comps[c])]),
                           self._tasks(i)))

    def base_values(self, i: int, metric: str) -> np.ndarray | None:
        """[B] values of `metric` for the base model (adapter scale 0), entry i's items giving the
        base's side: a `.tuned` metric's `.base` sibling; 1 for a ratio, 0 for a change or a KL."""
        stem, _, last = metric.rpartition(".")
        if last == "tuned":
            return self.values(i, f"{stem}.base")
        return np.full(self.replicates, SELF[last]) if last in SELF else None


def col_of(record: dict) -> str:
    """Any column of a component record (all have one value per item)."""
    return next(k for k in record if k != "key")
