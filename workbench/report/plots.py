"""The report's figures: one matplotlib `Figure` per PNG, built without pyplot (no global state,
no GUI backend) and saved atomically.

Every function returns a `Figure`, or None when its input has nothing to draw. The
learning-vs-forgetting figure, which needs compare's fronts, is workbench.report.tradeoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from workbench.formats.results import Entry, is_finite as finite
from workbench.formats.run_record import RunRecord
from workbench.io import atomic_path


@dataclass
class ReportEntry:
    """One results entry as the report sees it: a unique display name (a name two files share
    is prefixed with its file's stem) and the entry as read."""

    name: str
    entry: Entry
    run: str | None = None  # label of its run in the report, when that run was found

    @property
    def source(self) -> Path | None:
        return self.entry.source

    def value(self, metric: str) -> float | None:
        return self.entry.value(metric)

    def interval(self, metric: str) -> tuple[float, float] | None:
        return self.entry.interval(metric)


def save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
        tmp.chmod(0o644)  # mkstemp makes 0600; a report is meant to be read by others


# --- training curves ---------------------------------------------------------------------------


def loss_figure(label: str, run: RunRecord) -> Figure | None:
    """Total, task and eval loss vs step; below them, each penalty's weighted term; below that, when
    the run has a retention probe, the KL to the base (general text and the training batch) and the
    general-text perplexity ratio, with the KL budget and the selected checkpoint marked."""
    history = [h for h in run.history or [] if "step" in h]
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    if not train and not evals:
        return None
    terms = [p for p in _penalty_names(run, train) if any(f"{p}_weighted" in h for h in train)]
    probed = any(k in h for h in history for k in ("retention_kl", "retention_train_kl"))
    panels = 1 + bool(terms) + probed
    fig = Figure(figsize=(8.0, 2.4 + 2.2 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    _series(axes[0], train, "loss", "total loss", "-")
    _series(axes[0], train, "task_loss", "task loss", "--")
    _series(axes[0], evals, "eval_loss", "eval loss", "o")
    axes[0].set_ylabel("loss")
    for term in terms:
        _series(axes[1], train, f"{term}_weighted", f"{term} (weighted)", "-")
    if terms:
        axes[1].set_ylabel("weighted penalty")
    if probed:
        _retention_panel(axes[-1], run, history)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title(f"training losses: {label}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    return fig


def _retention_panel(ax, run: RunRecord, history: list[dict]) -> None:
    _series(ax, history, "retention_train_kl", "KL to base, training batch", "-")
    _series(ax, history, "retention_kl", "KL to base, general text (probe)", "o-")
    target = ((run.recipe.get("regularizers") or {}).get("kl_to_base") or {}).get("target")
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", label=f"KL budget {target:g}")
    selected = (getattr(run, "selection", None) or {}).get("step")
    if selected is not None:
        ax.axvline(selected, color="black", linestyle="--", linewidth=0.8, label=f"selected: step {selected}")
    ax.set_ylabel("nats per token")
    if any("retention_ppl_ratio" in h for h in history):
        twin = ax.twinx()
        _series(twin, history, "retention_ppl_ratio", "general-text perplexity ratio (right)", "s--", color="C2")
        bound = ((getattr(run, "selection", None) or {}).get("subject_to") or {}).get("retention_ppl_ratio")
        if bound is not None:
            twin.axhline(bound, color="C2", linestyle=":", label=f"perplexity ratio budget {bound:g}")
        twin.set_ylabel("perplexity ratio")
        twin.legend(fontsize=8, loc="upper right")


def _penalty_names(run: RunRecord, train: list[dict]) -> list[str]:
    named = list(run.penalties)
    found = sorted({k[: -len("_weighted")] for h in train for k in h if k.endswith("_weighted")})
    return named + [p for p in found if p not in named]


def _series(ax, history: list[dict], key: str, label: str, style: str, **kwargs) -> None:
    points = [(h["step"], h[key]) for h in history if finite(h.get(key)) and finite(h.get("step"))]
    if points:
        ax.plot(*zip(*points), style, label=label, **kwargs)


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
