"""The metric catalogue: every name `workbench eval` writes into `results.json`, in one place.

Each family has a name pattern, a direction (is higher better for the fine-tune?), a unit and a
one-line meaning. The gate, the report, the sweep and W&B tracking read names through this
module; `docs/results.md` is generated from it (`markdown_table`) and a test keeps the two equal.

Patterns use `<task>` for a multiple-choice task name ("all" pools every task's items) and
`<score>` for a membership-inference score; `{a,b}` expands to one family per alternative.
A side `.base`/`.tuned` is the value on each model, `.delta` is tuned − base and `.ratio`
tuned / base; each keeps the direction of the quantity it compares.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher", "lower", "none"]

# W&B groups the sections under these prefixes (overfitting.loss_gap -> overfit/loss_gap).
SECTIONS = {"learning": "learning", "retention": "retention", "overfitting": "overfit",
            "calibration": "calibration"}
CHANGES = ("delta", "ratio")  # how a tuned value is compared with its base, in metric names
SIDES = ("base", "tuned", *CHANGES)
MIA_SCORES = ("loss", "min_k", "loss_ratio")


@dataclass(frozen=True)
class MetricFamily:
    pattern: str  # e.g. "retention.mc.<task>.acc.delta"
    direction: Direction  # which way is better for the fine-tune
    unit: str
    meaning: str

    @property
    def regex(self) -> re.Pattern:
        return _compiled(self.pattern)

    def example(self, task: str = "all", score: str = "loss") -> str:
        return self.pattern.replace("<task>", task).replace("<score>", score)


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    """A family's pattern as a regex, built once: names are looked up per metric of every entry."""
    parts = re.split(r"(<task>|<score>)", pattern)
    return re.compile("".join({"<task>": r"[^.]+", "<score>": "|".join(MIA_SCORES).join("()")}.get(p, re.escape(p))
                              for p in parts))


def _expand(pattern: str, direction: Direction, unit: str, meaning: str) -> list[MetricFamily]:
    pieces = [p.strip("{}").split(",") if p.startswith("{") else [p] for p in re.split(r"(\{[^}]*\})", pattern) if p]
    return [MetricFamily("".join(combo), direction, unit, meaning) for combo in itertools.product(*pieces)]


# (pattern, better, unit, meaning): one row per family; the table in docs/results.md is made from it.
_ROWS = [
    ("learning.val_loss.{base,tuned,delta}", "lower", "nats/token",
     "mean token NLL on held-out target examples"),
    ("learning.val_ppl.{base,tuned}", "lower", "perplexity",
     "exp of the held-out target loss"),
    ("learning.exact_match.{base,tuned,delta}", "higher", "fraction",
     "greedy generation equals the reference completion"),
    ("retention.general.ppl.{base,tuned,ratio}", "lower", "perplexity",
     "token perplexity on held-out general text"),
    ("retention.general.kl", "lower", "nats/token",
     "mean per-token KL(base ‖ tuned) on general text, top-k lower bound (the tail as one outcome)"),
    ("retention.general.kl_upper", "lower", "nats/token",
     "the same KL's top-k upper bound; equal to `kl` when top_k is the vocabulary"),
    ("retention.general.top1_agreement", "higher", "fraction",
     "argmax(base) == argmax(tuned), per general-text token"),
    ("retention.mc.<task>.acc.{base,tuned,delta}", "higher", "fraction",
     "multiple-choice accuracy, the choice with the highest log-likelihood (lm-evaluation-harness `acc`)"),
    ("retention.mc.<task>.acc_norm.{base,tuned,delta}", "higher", "fraction",
     "the same with log-likelihoods per byte of the choice (lm-evaluation-harness `acc_norm`)"),
    ("overfitting.train_loss.tuned", "none", "nats/token",
     "the target NLL on training examples"),
    ("overfitting.loss_gap", "lower", "nats/token",
     "val_loss.tuned - train_loss.tuned"),
    ("overfitting.extraction.{train,heldout}", "none", "fraction",
     "a prompt yields its exact completion under greedy decoding, on train or held-out examples"),
    ("overfitting.extraction.gap", "lower", "fraction",
     "extraction on train minus on held-out"),
    ("overfitting.mia.<score>.auc", "lower", "fraction",
     "membership inference ROC-AUC, train vs held-out examples; <score>: loss, min_k or loss_ratio"),
    ("overfitting.mia.<score>.tpr_at_1pct_fpr", "lower", "fraction",
     "the same attack's true-positive rate at 1% false positives"),
    ("calibration.<task>.ece.{base,tuned,delta}", "lower", "fraction",
     "expected calibration error of the chosen answer's probability, equal-width bins"),
    ("calibration.<task>.ece_adaptive.{base,tuned,delta}", "lower", "fraction",
     "the same with equal-count bins"),
    ("calibration.<task>.brier.{base,tuned,delta}", "lower", "fraction",
     "Brier score of the probabilities over the choices"),
]
CATALOGUE: tuple[MetricFamily, ...] = tuple(f for row in _ROWS for f in _expand(*row))

CURVES: tuple[MetricFamily, ...] = (
    MetricFamily("overfitting.mia.<score>.roc", "none", "{fpr, tpr}", "ROC curve of the membership score"),
    MetricFamily("calibration.<task>.reliability", "none", "{base, tuned}: bins",
                 "reliability bins {lo, hi, count, accuracy, confidence}, equal width"),
)


def metric_family(name: str) -> MetricFamily | None:
    """The catalogue entry a metric name belongs to, or None when it is not a catalogued metric."""
    return next((f for f in CATALOGUE if f.regex.fullmatch(name)), None)


def is_metric(name: str) -> bool:
    return metric_family(name) is not None


def higher_is_better(name: str) -> bool | None:
    """True or False for a catalogued metric with a direction; None for a descriptive one."""
    found = metric_family(name)
    if found is None:
        raise KeyError(f"{name!r} is not a results.json metric")
    return None if found.direction == "none" else found.direction == "higher"


def examples() -> list[str]:
    """One concrete name per family (<task> -> all, every <score>): what a policy may match."""
    return [f.example(score=s) for f in CATALOGUE for s in (MIA_SCORES if "<score>" in f.pattern else ("",))]


def wandb_key(metric: str) -> str:
    """A results.json metric name as a W&B summary key: retention.general.ppl.ratio ->
    retention/general/ppl/ratio, overfitting.loss_gap -> overfit/loss_gap."""
    section, _, rest = metric.partition(".")
    return f"{SECTIONS.get(section, section)}/{rest.replace('.', '/')}" if rest else metric


def markdown_table() -> str:
    """The catalogue as the Markdown table in docs/results.md, families with the same meaning
    merged back into one row with their alternatives in braces."""
    rows: dict[tuple, list[str]] = {}
    for f in CATALOGUE:
        stem, _, side = f.pattern.rpartition(".")
        key = (stem if side in SIDES else f.pattern, f.direction, f.unit, f.meaning)
        rows.setdefault(key, []).append(side if side in SIDES else "")
    lines = ["| metric | better | unit | meaning |", "|---|---|---|---|"]
    for (stem, direction, unit, meaning), sides in rows.items():
        name = stem if sides == [""] else f"{stem}.{{{','.join(sides)}}}" if len(sides) > 1 else f"{stem}.{sides[0]}"
        lines.append(f"| `{name}` | {direction} | {unit} | {meaning} |")
    return "\n".join(lines) + "\n"
