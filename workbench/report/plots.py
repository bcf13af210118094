"""The report's figures: one matplotlib `Figure` per PNG, built without pyplot (no global state,
no GUI backend) and saved atomically.

Every function returns a `Figure`, or None when its input has nothing to draw.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from workbench.formats.metrics import higher_is_better
from workbench.formats.run_record import RunRecord
from workbench.io import atomic_path

# (metric, its value at the base, axis label): the first one any entry has is used
FORGETTING = [
    ("retention.general.ppl.ratio", 1.0, "forgetting: general-text perplexity, tuned / base  (1 = none)"),
    ("retention.general.kl", 0.0, "forgetting: KL(base || tuned) per token on general text  (0 = none)"),
]
MC_RETENTION = ("retention.mc.all.acc.delta", 0.0,
                "retention: multiple-choice accuracy, tuned − base  (0 = unchanged)")


def _learning(prefix: str, what: str) -> tuple[str, str]:
    """(metric prefix with .base/.tuned, axis label), the direction read from the catalogue."""
    better = "higher" if higher_is_better(f"{prefix}.tuned") else "lower"
    return prefix, f"learning: {what}  ({better} is better)"


# one panel each where present
LEARNING = [_learning("learning.val_loss", "held-out val loss"), _learning("learning.exact_match", "exact match")]


@dataclass
class ReportEntry:
    """One results entry as the report sees it: a unique display name, and the key shared by
    the entries that are one adapter at several LoRA scales."""

    name: str
    data: dict
    sweep: str
    source: Path | None = None
    run: str | None = None  # label of its run in the report, when that run was found

    @property
    def scale(self) -> float:
        scale = self.data.get("scale")
        return 1.0 if scale is None else float(scale)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def value(entry: ReportEntry, name: str) -> float | None:
    """A metric's value, or None when missing, null or not finite."""
    record = entry.data["metrics"].get(name)
    v = record.get("value") if isinstance(record, dict) else None
    return float(v) if finite(v) else None


def interval(entry: ReportEntry, name: str) -> tuple[float, float] | None:
    record = entry.data["metrics"].get(name)
    ci = record.get("ci") if isinstance(record, dict) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(c) for c in ci):
        return float(ci[0]), float(ci[1])
    return None


def save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
        tmp.chmod(0o644)  # mkstemp makes 0600; a report is meant to be read by others


# --- learning vs forgetting --------------------------------------------------------------------


def tradeoff_figure(entries: list[ReportEntry], x_axis: tuple[str, float, str]) -> Figure | None:
    """Learning (y, one panel per learning metric present) against `x_axis` = (metric, value at
    the base, label); the base is a star, a scale sweep a line from the base through its scales."""
    x_name = x_axis[0]
    panels = [(prefix, label) for prefix, label in LEARNING
              if any(value(e, x_name) is not None and value(e, f"{prefix}.tuned") is not None
                     for e in entries)]
    if not panels:
        return None
    fig = Figure(figsize=(6.6 * len(panels), 5.0), layout="constrained")
    for ax, (prefix, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _tradeoff_panel(ax, entries, x_axis[:2], prefix)
        ax.set_xlabel(x_axis[2])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _tradeoff_panel(ax, entries: list[ReportEntry], x_axis: tuple[str, float], prefix: str) -> None:
    x_name, x_base = x_axis
    bases = sorted({round(b, 12) for e in entries if (b := value(e, f"{prefix}.base")) is not None})
    for i, base in enumerate(bases):
        ax.plot([x_base], [base], "*", color="black", markersize=16, zorder=4,
                label="base" if i == 0 else None)
    for color, (label, members) in enumerate(_sweeps(entries)):
        points = [(e, value(e, x_name), value(e, f"{prefix}.tuned")) for e in members]
        points = [p for p in points if p[1] is not None and p[2] is not None]
        if points:
            _draw_sweep(ax, points, (x_name, x_base, f"{prefix}.tuned"), label, f"C{color % 10}")


def _sweeps(entries: list[ReportEntry]) -> list[tuple[str, list[ReportEntry]]]:
    """(display label, entries sorted by scale) per sweep key, in first-seen order."""
    groups: dict[str, list[ReportEntry]] = defaultdict(list)
    for e in entries:
        groups[e.sweep].append(e)
    out = []
    for members in groups.values():
        members.sort(key=lambda e: e.scale)
        label = members[-1].name.split("@")[0] if len(members) > 1 else members[0].name
        out.append((label, members))
    return out


def _draw_sweep(ax, points, names: tuple[str, float, str], label: str, color: str) -> None:
    x_name, x_base, y_name = names
    is_sweep = len(points) > 1 or points[0][0].scale != 1.0
    if is_sweep:
        base_y = value(points[0][0], y_name.replace(".tuned", ".base"))
        start = [(x_base, base_y)] if base_y is not None and points[0][0].scale > 0 else []
        xs, ys = zip(*(start + [(x, y) for _, x, y in points]))
        ax.plot(xs, ys, "-", color=color, alpha=0.6, zorder=2)
    for i, (entry, x, y) in enumerate(points):
        ax.errorbar([x], [y], xerr=_err(x, interval(entry, x_name)),
                    yerr=_err(y, interval(entry, y_name)), fmt="o", color=color, capsize=3,
                    zorder=3, label=label if i == 0 else None)
        if is_sweep:
            ax.annotate(f"×{entry.scale:g}", (x, y), textcoords="offset points", xytext=(5, 5),
                        fontsize=8, color=color)


def _err(v: float, ci: tuple[float, float] | None):
    if ci is None:
        return None
    return [[max(v - ci[0], 0.0)], [max(ci[1] - v, 0.0)]]


# --- training curves ---------------------------------------------------------------------------


def loss_figure(label: str, run: RunRecord) -> Figure | None:
    """Total, task and eval loss vs step; below them, each penalty's weighted term."""
    history = [h for h in run.history or [] if "step" in h]
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    if not train and not evals:
        return None
    terms = [p for p in _penalty_names(run, train) if any(f"{p}_weighted" in h for h in train)]
    fig = Figure(figsize=(8.0, 6.8 if terms else 4.4), layout="constrained")
    axes = fig.subplots(2 if terms else 1, 1, sharex=True, squeeze=False)[:, 0]
    _series(axes[0], train, "loss", "total loss", "-")
    _series(axes[0], train, "task_loss", "task loss", "--")
    _series(axes[0], evals, "eval_loss", "eval loss", "o")
    axes[0].set_ylabel("loss")
    for term in terms:
        _series(axes[1], train, f"{term}_weighted", f"{term} (weighted)", "-")
    if terms:
        axes[1].set_ylabel("weighted penalty")
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title(f"training losses: {label}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _penalty_names(run: RunRecord, train: list[dict]) -> list[str]:
    named = list(run.penalties)
    found = sorted({k[: -len("_weighted")] for h in train for k in h if k.endswith("_weighted")})
    return named + [p for p in found if p not in named]


def _series(ax, history: list[dict], key: str, label: str, style: str) -> None:
    points = [(h["step"], h[key]) for h in history if finite(h.get(key)) and finite(h.get("step"))]
    if points:
        ax.plot(*zip(*points), style, label=label)


# --- calibration and membership inference ------------------------------------------------------


def reliability_figure(title: str, curve: dict, ece: dict[str, float | None]) -> Figure | None:
    """Base and tuned reliability diagrams side by side: accuracy per confidence bin against the
    diagonal of perfect calibration."""
    sides = [s for s in ("base", "tuned") if isinstance(curve, dict) and _bins(curve.get(s))]
    if not sides:
        return None
    fig = Figure(figsize=(4.6 * len(sides), 4.6), layout="constrained")
    for ax, side in zip(fig.subplots(1, len(sides), squeeze=False, sharey=True)[0], sides):
        bins = _bins(curve[side])
        ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
        edged = [b for b in bins if finite(b.get("lo")) and finite(b.get("hi"))]
        ax.bar([b["lo"] for b in edged], [b["accuracy"] for b in edged], align="edge",
               width=[b["hi"] - b["lo"] for b in edged], alpha=0.35, edgecolor="C0",
               label="accuracy per bin")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="C1",
                label="accuracy at mean confidence")
        ece_text = f", ECE {ece[side]:.3f}" if finite(ece.get(side)) else ""
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{side}{ece_text}")
        ax.legend(fontsize=8, loc="upper left")
    fig.axes[0].set_ylabel("accuracy")
    fig.suptitle(title)
    return fig


def _bins(bins) -> list[dict]:
    """Non-empty bins with finite accuracy and confidence (empty ones hold NaN or null)."""
    return [b for b in bins or [] if isinstance(b, dict) and b.get("count")
            and finite(b.get("accuracy")) and finite(b.get("confidence"))]


def roc_figure(title: str, rocs: dict[str, dict], aucs: dict[str, float | None]) -> Figure | None:
    """Membership-inference ROC curves, one per score, with the chance diagonal."""
    rocs = {s: c for s, c in rocs.items() if isinstance(c, dict) and c.get("fpr") and c.get("tpr")}
    if not rocs:
        return None
    fig = Figure(figsize=(5.4, 5.0), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="gray", label="chance (AUC 0.5)")
    for score, curve in sorted(rocs.items()):
        auc = aucs.get(score)
        ax.plot(curve["fpr"], curve["tpr"], label=f"{score} (AUC {auc:.3f})" if finite(auc) else score)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (held-out called member)",
           ylabel="true positive rate (training example called member)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig
