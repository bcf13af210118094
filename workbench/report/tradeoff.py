"""Learning against forgetting: each family drawn as its Pareto front, the reference shaded.

The question the page answers (docs/compare.md) is whether a regularizer forgets less than
training less at the same learning, so the figure puts learning on x and forgetting on y, draws
every family's front (compare's, via workbench.report.families) as a line through its points,
and shades what the reference front dominates: the band between it and the worse edge of the
plot holds every (learning, forgetting) that forgets more than training less would at that
learning. A family whose line runs outside the band forgets less. Points off their family's
front are drawn hollow; the base is the star where every recipe starts (scale 0). Learning grows
to the right in every panel (a lower-is-better axis such as val loss is reversed), so the
panels' fronts have the same shape and can be read side by side.

The perplexity ratio's y axis is logarithmic: one run that doubles perplexity would otherwise
squash every other point into the bottom few pixels.
"""

from __future__ import annotations

import math

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from workbench.formats.metrics import higher_is_better
from workbench.report.families import Front, family_front, grouped
from workbench.report.plots import ReportEntry

PPL_RATIO = "retention.general.ppl.ratio"
# (metric, its value at the base, axis label in two lines, each shorter than the axis is tall):
# the first one any entry has is used
FORGETTING = [
    (PPL_RATIO, 1.0, "forgetting: general-text perplexity, tuned / base\n(1 = none, lower is better; log scale)"),
    ("retention.general.kl", 0.0, "forgetting: KL(base || tuned) per token\n(on general text; 0 = none)"),
]
MC_RETENTION = ("retention.mc.all.acc.delta", 0.0,
                "retention: multiple-choice accuracy, tuned − base\n(0 = unchanged, higher is better)")
REFERENCE_COLOR = "0.2"
LOG_TICKS = 7  # about this many labelled ticks on a log axis


def _learning(prefix: str, what: str) -> tuple[str, str]:
    """(metric prefix with .base/.tuned, axis label), the direction read from the catalogue."""
    better = "higher" if higher_is_better(f"{prefix}.tuned") else "lower"
    return prefix, f"learning: {what}  ({better} is better)"


# one panel each where present
LEARNING = [_learning("learning.val_loss", "held-out val loss"), _learning("learning.exact_match", "exact match")]


def tradeoff_figure(entries: list[ReportEntry], y_axis: tuple[str, float, str],
                    reference: str | None = None) -> Figure | None:
    """Forgetting (`y_axis` = (metric, value at the base, label)) against learning, one panel per
    learning metric present; `reference` is the family shaded as training less (none when it is
    absent). None when no entry has both coordinates."""
    y_name = y_axis[0]
    panels = []
    for prefix, label in LEARNING:
        if grouped(entries, f"{prefix}.tuned", y_name) and not _constant(entries, prefix):
            window = _zoom(entries, prefix, y_name)
            panels += [(prefix, label, None)] + ([(prefix, label + ", the fine-tunes up close", window)]
                                                 if window else [])
    if not panels:
        return None
    colors = _colors(list(grouped(entries)), reference)  # every family, so both figures agree
    # two panels a row at most: three in a row are ~300 px tall on a 1,200 px page, too small to read
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(6.2 * cols + 2.6, 4.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (prefix, label, window) in zip(axes, panels):
        _panel(ax, entries, prefix, y_axis, colors, reference, window)
        if not higher_is_better(f"{prefix}.tuned"):  # more learning to the right in every panel
            ax.invert_xaxis()
            label += ", axis reversed"
        ax.set_xlabel(label)
        ax.set_ylabel(y_axis[2])
        ax.grid(alpha=0.3)
    handles, labels = _legend(axes)
    fig.legend(handles, labels, loc="outside right upper", fontsize=9, title="family (front)")
    return fig


def _constant(entries: list[ReportEntry], prefix: str) -> bool:
    """Whether a learning metric is the same for every entry and the base (exact match 0
    everywhere on a model that never completes the task): a panel of one vertical line says
    nothing, so it is dropped."""
    seen = {round(v, 12) for e in entries for side in ("tuned", "base")
            if (v := e.value(f"{prefix}.{side}")) is not None}
    return len(seen) <= 1


def _zoom(entries: list[ReportEntry], prefix: str, y_name: str
          ) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """(x limits, y limits) around the fine-tuned points when the base sits further from them
    than they spread (a base val loss of 11.8 and fine-tunes between 3.8 and 4.6 leave the
    fine-tunes in a sliver of the panel); None when they already fill it."""
    points = [(e.value(f"{prefix}.tuned"), e.value(y_name), e.interval(y_name)) for e in entries]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    bases = [b for e in entries if (b := e.value(f"{prefix}.base")) is not None]
    if len(points) < 2 or not bases:
        return None
    xs = [x for x, _, _ in points]
    spread = max(xs) - min(xs)
    if spread <= 0 or min(abs(b - x) for b in bases for x in xs) <= spread:
        return None
    ys = [bound for _, y, ci in points for bound in (ci or (y, y))]
    low, high = min(ys), max(ys)
    if y_name == PPL_RATIO and low > 0:  # pad in log space, as the axis is drawn
        pad = (high / low) ** 0.06
        y_window = (low / pad, high * pad)
    else:
        pad = 0.06 * (high - low or abs(high) or 1.0)
        y_window = (low - pad, high + pad)
    return (min(xs) - 0.06 * spread, max(xs) + 0.06 * spread), y_window


def _colors(families: list[str], reference: str | None) -> dict[str, str]:
    """One colour per family, the same in every panel and figure of a page; the reference grey."""
    others = [f for f in families if f != reference]
    return {**{f: f"C{i % 10}" for i, f in enumerate(others)}, **({reference: REFERENCE_COLOR} if reference else {})}


def _panel(ax, entries: list[ReportEntry], prefix: str, y_axis: tuple[str, float, str],
           colors: dict[str, str], reference: str | None, window=None) -> None:
    """One panel: the base, every family's front and points; `window` ((x0, x1), (y0, y1))
    crops it to the fine-tunes (fronts run on toward the base beyond the edge)."""
    y_name, y_base, _ = y_axis
    x_name = f"{prefix}.tuned"
    if y_name == PPL_RATIO:
        ax.set_yscale("log")
    bases = sorted({round(b, 12) for e in entries if (b := e.value(f"{prefix}.base")) is not None})
    for i, base in enumerate(bases):
        # under the points (zorder 2): a scale near 0 sits on the base and must still show
        ax.plot([base], [y_base], "*", color="black", markersize=15, zorder=2,
                label="base (every recipe at scale 0)" if i == 0 else None)
    families = grouped(entries, x_name, y_name)
    by_name = {e.name: e for e in entries}
    ref_front = None
    for family, seeds in families.items():
        front = family_front(seeds, x_name, y_name)
        color = colors.get(family, "C9")
        is_ref = family == reference
        xs, ys = zip(*front.curve)
        # the reference dashed and on top: a family that matches it still shows through the gaps
        ax.plot(xs, ys, "--" if is_ref else "-", color=color, lw=2.0 if is_ref else 1.8,
                zorder=4.5 if is_ref else 3, label=f"{family} (reference)" if is_ref else family)
        for member in (e for members in seeds.values() for e in members):
            _point(ax, by_name[member.name], (x_name, y_name), color, member.name in front.members, is_ref)
        if is_ref:
            ref_front = front
    ax.autoscale_view()
    if window is not None:
        ax.set_xlim(*window[0])
        ax.set_ylim(*window[1])
    if y_name == PPL_RATIO:
        _log_ticks(ax)
    if ref_front is not None and len(ref_front.curve) > 1:  # a one-point front bounds no band
        _shade(ax, ref_front, higher_is_better(y_name), colors[reference], reference)


def _point(ax, entry: ReportEntry, names: tuple[str, str], color: str, on_front: bool, tag: bool) -> None:
    """One entry with its CIs (bars without caps: caps on both axes read as an 'H' over the
    marker), hollow when its family's front passes it by (dominated). `tag` writes its scale or
    step beside it; only the reference's are tagged, since every family meets at the base and
    tags of several families there overprint each other."""
    (x, y), (x_name, y_name) = (entry.value(n) for n in names), names
    ax.errorbar([x], [y], xerr=_err(x, entry.interval(x_name)), yerr=_err(y, entry.interval(y_name)),
                fmt="o", color=color, markerfacecolor=color if on_front else "white", markersize=5.5,
                elinewidth=0.9, alpha=0.9, zorder=4)
    text = _tag(entry) if tag else ""
    if text:
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, -11), fontsize=8, color=color)


def _tag(entry: ReportEntry) -> str:
    """What tells an entry from its family's others: its scale (×0.5) or checkpoint step; none
    at scale 0, which is the base's star."""
    scale, step = entry.entry.scale, entry.entry.step
    if scale == 0:
        return ""
    parts = ([f"×{scale:g}"] if scale != 1 else []) + \
            ([f"step {step}"] if ":step" in entry.entry.name and step is not None else [])
    return " ".join(parts)


def _err(v: float, ci: tuple[float, float] | None):
    if ci is None:
        return None
    return [[max(v - ci[0], 0.0)], [max(ci[1] - v, 0.0)]]


def _log_ticks(ax) -> None:
    """Ticks for a ratio on a log axis: 1 (the base) and 1 ± 1, 2, 5 x 10^k (above 2: 2, 5, 10,
    20, ...), every one far enough in log from those kept before it that the labels do not
    touch. Matplotlib's own sit at powers of ten and 2..9 times them, so an axis from 1.0 to 1.3
    would show no labelled tick at all."""
    lo, hi = ax.get_ylim()
    gap = math.log(hi / lo) / (2 * LOG_TICKS)
    kept = [1.0] if lo <= 1.0 <= hi else []
    for t in _candidates(lo, hi):
        if all(abs(math.log(t / k)) > gap for k in kept):
            kept.append(t)
    ax.yaxis.set_major_locator(FixedLocator(sorted(kept)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(lo, hi)


def _candidates(lo: float, hi: float) -> list[float]:
    """Round ratios in [lo, hi], nearest 1 first: 1 ± d for d = 1..9 x 10^k below 1 (an axis
    from 0.55 to 0.7 gets 0.6 and 0.7, where 1, 2, 5 x 10^k alone gave none), and 2, 5 x 10^k
    from 2 up."""
    found = set()
    for k in range(math.floor(math.log10((hi - lo) / 100)), math.ceil(math.log10(hi)) + 1):
        for m in range(1, 10):
            d = m * 10.0 ** k
            found |= ({round(1 + d, 12), round(1 - d, 12)} if d < 1 else
                      {round(d, 12)} if d >= 2 and m in (1, 2, 5) else set())
    return sorted((t for t in found if lo <= t <= hi), key=lambda t: abs(math.log(t)))


def _shade(ax, front: Front, higher: bool, color: str, family: str) -> None:
    """Fill between the reference front and the plot's worse edge (top for a lower-is-better
    metric, bottom for a higher-is-better one), over the front's learning range only: compare
    never extrapolates a front, so neither does the band."""
    lo, hi = ax.get_ylim()
    xs, ys = zip(*sorted(front.curve))
    ax.fill_between(xs, ys, lo if higher else hi, color=color, alpha=0.13, lw=0, zorder=1,
                    label=f"forgets more than {family} (training less)")
    ax.set_ylim(lo, hi)


def _legend(axes) -> tuple[list, list[str]]:
    """The panels' handles, each label once: every panel draws the same families."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)
