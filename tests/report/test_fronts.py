"""The report's fronts and its matched-learning table: the table leads the page above the folded
per-run detail, agrees with `workbench compare`, takes a compare.json as given, and gives way to a
one-line note when there is no reference; the plot draws one front per family and shades the
reference's, on a log axis for the perplexity ratio."""

import json
import re

import pytest
from matplotlib.collections import PolyCollection

from tests.report.study import point, results, study
from workbench.compare.analysis import compare
from workbench.compare.command import run_compare, to_json
from workbench.errors import UsageError
from workbench.formats.results import Entry
from workbench.io import write_json
from workbench.report.build import build_report
from workbench.report.inputs import load_inputs
from workbench.report.matched import compute
from workbench.report.plots import ReportEntry
from workbench.report.tradeoff import FORGETTING, MC_RETENTION, tradeoff_figure

FAMILIES = {"baseline", "kl", "ewc", "hot_lr"}


def build(tmp_path, entries, *extra):
    path = tmp_path / "results.json"
    write_json(path, results(entries))
    index = build_report([path, *extra], tmp_path / "report")
    return index.read_text(), (tmp_path / "report" / "report.md").read_text()


def verdicts(html: str) -> dict[tuple[str, str], str]:
    """(family, metric) -> verdict, read from the matched-learning table's rows."""
    table = html[html.index('<table class="matched">'):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td[^>]*>([^<]+)</td>", table)
    return {(family, metric): verdict for family, metric, verdict in rows}


def test_the_matched_learning_table_leads_and_the_detail_is_folded(tmp_path):
    html, md = build(tmp_path, study())
    found = verdicts(html)
    assert found[("kl", "retention.general.ppl.ratio")] == "helps"
    assert found[("ewc", "retention.general.ppl.ratio")] == "no different"
    assert found[("hot_lr", "retention.general.kl")] == "worse"
    assert len(found) == 3 * 3  # three families besides the reference, three forgetting metrics
    table, entries = html.index('<table class="matched">'), html.index('<h2 id="entries">')
    assert table < html.index("<h2>Learning vs forgetting</h2>") < html.index("<h2>Summary</h2>") < entries
    assert html.count('<details class="entry">') == len(study())  # one fold per entry, closed
    assert "<details open" not in html and " open>" not in html
    assert md.index("## Forgetting at matched learning") < md.index("## Summary") < md.index("## Entries")
    assert "| kl | `retention.general.ppl.ratio` | **helps** | helps at L3..L5 |" in md


def test_the_computed_table_is_what_workbench_compare_writes(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, results(study()))
    loaded = load_inputs([path])
    ours, notes = compute(loaded.entries, loaded.results)
    theirs = to_json(compare([path]))
    assert notes == [] and {**ours, "created": None} == {**theirs, "created": None}


def test_a_family_with_one_point_is_left_out_and_named(tmp_path):
    html, md = build(tmp_path, study() + [point("solo", 1.0, forgets=0.05)])
    assert "left out, one point (in some seed), so no front: solo" in html
    assert ("kl", "retention.general.kl") in verdicts(html)
    assert not any(family == "solo" for family, _ in verdicts(html))


def test_a_compare_json_is_shown_as_given(tmp_path, capsys):
    """compare run with its own reference, one forgetting metric and 3 levels: the page shows that
    table, not one of its own, and shades that reference in the plots."""
    entries = study(reference="lr_low")
    path = tmp_path / "results.json"
    write_json(path, results(entries))
    out = tmp_path / "compare.json"
    run_compare([path], reference="lr_low", forgetting=["retention.general.kl"], levels=3, out=out)
    capsys.readouterr()
    index = build_report([path, out], tmp_path / "report")
    html = index.read_text()
    assert set(verdicts(html)) == {(f, "retention.general.kl") for f in ("kl", "ewc", "hot_lr")}
    assert f"Source: {out}" in html and "<b>lr_low</b>" in html
    assert "<td>L3</td>" in html and "<td>L4</td>" not in html
    assert "shaded: forgets more than lr_low" in html  # the plot's caption names the shaded family


def test_no_reference_family_builds_the_page_with_a_one_line_note(tmp_path):
    html, md = build(tmp_path, [e for e in study() if e["family"] != "baseline"])
    assert '<table class="matched">' not in html and "<h2>Forgetting at matched learning</h2>" in html
    notes = re.findall(r'<p class="note">([^<]*)</p>', html)
    assert len(notes) == 1 and "no family &#39;baseline&#39; to stand for training less" in notes[0]
    assert "\n" not in notes[0]
    assert "No matched-learning comparison: no family 'baseline'" in md
    assert "Learning vs forgetting" in html and "<h3>kl</h3>" in html


def test_files_from_different_suites_get_a_note_not_a_table(tmp_path):
    write_json(tmp_path / "a.json", results([e for e in study() if e["family"] == "baseline"]))
    other = results([e for e in study() if e["family"] == "kl"])
    other["suite"]["fingerprint"] = "zzz"
    write_json(tmp_path / "b.json", other)
    html = build_report([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "out").read_text()
    assert '<table class="matched">' not in html and "suite fingerprint zzz differs" in html


@pytest.mark.parametrize("change, message", [({"schema_version": 2}, "schema_version 2"),
                                             ({"families": [{"family": "kl"}]}, "not a workbench.compare file")])
def test_a_bad_compare_json_is_one_usage_error(tmp_path, capsys, change, message):
    path = tmp_path / "results.json"
    write_json(path, results(study()))
    out = tmp_path / "compare.json"
    run_compare([path], out=out)
    capsys.readouterr()
    write_json(out, {**json.loads(out.read_text()), **change})
    with pytest.raises(UsageError, match=message) as info:
        build_report([path, out], tmp_path / "report")
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "report").exists()


# ---------------------------------------------------------------- the plot


def shown(data: dict) -> ReportEntry:
    return ReportEntry(data["name"], Entry.model_validate(data))


def entries() -> list[ReportEntry]:
    return [shown(e) for e in study()]


def frontier_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.lines if not line.get_label().startswith(("_", "base "))]


def test_the_ratio_plot_is_log_scaled_with_one_front_per_family_and_one_shaded_reference():
    fig = tradeoff_figure(entries(), FORGETTING[0], reference="baseline")
    assert len(fig.axes) == 2  # val loss and exact match panels
    for ax in fig.axes:
        assert ax.get_yscale() == "log"
        labels = frontier_labels(ax)
        assert sorted(labels) == sorted(["baseline (reference)", "kl", "ewc", "hot_lr"])  # ewc: two seeds, one line
        shaded = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(shaded) == 1
        top = max(y for path in shaded[0].get_paths() for _, y in path.vertices)
        assert top == pytest.approx(ax.get_ylim()[1])  # lower is better: the band reaches up
        assert 1.0 in ax.get_yticks()  # the base's ratio is labelled
    assert [ax.get_xaxis().get_inverted() for ax in fig.axes] == [True, False]  # more learning to the right


def test_the_accuracy_plot_is_linear_and_shades_downwards():
    fig = tradeoff_figure(entries(), MC_RETENTION, reference="baseline")
    for ax in fig.axes:
        assert ax.get_yscale() == "linear" and len(frontier_labels(ax)) == len(FAMILIES)
        (shaded,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
        bottom = min(y for path in shaded.get_paths() for _, y in path.vertices)
        assert bottom == pytest.approx(ax.get_ylim()[0])  # higher is better: the band reaches down


def test_the_front_skips_dominated_points_and_every_point_is_drawn():
    """A baseline point that forgets more than a point which learns more is off the front: the
    line has one vertex fewer than the family has points, and the point is still drawn."""
    data = study()
    dominated = point("baseline", 0.6, learns=1.0, forgets=0.5)  # val loss 2.4 but ratio 1.18
    rows = [shown(e) for e in [*data, dominated]]
    ax = tradeoff_figure(rows, FORGETTING[0], reference="baseline").axes[0]
    (line,) = [line for line in ax.lines if line.get_label() == "baseline (reference)"]
    assert len(line.get_xdata()) == 5  # the five scales; not the dominated sixth point
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "white"]
    assert [tuple(line.get_xydata()[0]) for line in hollow] == [(2.4, pytest.approx(1.18))]


def test_without_a_reference_nothing_is_shaded():
    ax = tradeoff_figure(entries(), FORGETTING[0], reference=None).axes[0]
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_family_falls_back_to_the_name_before_at_or_colon():
    assert [Entry(name=n, metrics={}).family for n in ("kl@0.5", "kl:step20", "kl")] == ["kl"] * 3
    assert Entry(name="x@0.5", family="ewc", metrics={}).family == "ewc"


def test_a_distant_base_adds_a_panel_up_close_on_the_fine_tunes():
    """Fine-tunes between val loss 3.8 and 4.6 and a base at 11.8: the full panel keeps the base,
    a second one crops to the fine-tunes' learning (padded by 6% of their spread) and to their
    forgetting with its CIs; without the distant base there is no second panel."""
    def near(name, family, loss, ratio):
        e = {**point(family, 1.0), "name": name}
        e["metrics"]["learning.val_loss.tuned"] = {"value": loss}
        e["metrics"]["learning.val_loss.base"] = {"value": 11.8}
        e["metrics"]["retention.general.ppl.ratio"] = {"value": ratio, "ci": [ratio * 0.9, ratio * 1.1]}
        del e["metrics"]["learning.exact_match.tuned"]
        return shown(e)
    rows = [near("b1", "baseline", 3.8, 4.0), near("b2", "baseline", 4.6, 1.2), near("k1", "kl", 4.2, 1.5)]
    fig = tradeoff_figure(rows, FORGETTING[0], reference="baseline")
    assert len(fig.axes) == 2 and "up close" in fig.axes[1].get_xlabel()
    whole, close = fig.axes
    assert max(whole.get_xlim()) > 11.8  # the base star is in the whole panel
    assert sorted(close.get_xlim()) == pytest.approx([3.8 - 0.048, 4.6 + 0.048])
    low, high = close.get_ylim()
    pad = (4.4 / 1.08) ** 0.06
    assert (low, high) == pytest.approx((1.08 / pad, 4.4 * pad))
    for row in rows:  # without the distant base: one panel
        row.entry.metrics["learning.val_loss.base"].value = 5.0
    assert len(tradeoff_figure(rows, FORGETTING[0], reference="baseline").axes) == 1


def test_with_per_item_scores_the_computed_table_is_compare_s_paired_one(tmp_path):
    """Schema 2 results carry per-item scores: the report's own table resamples them jointly, as
    `workbench compare` does, rather than falling back to independent CIs."""
    from tests.compare.build import results as with_items, synthetic_study

    path = tmp_path / "results.json"
    write_json(path, with_items(synthetic_study(families=(("baseline", 1.0, 1.0, 2), ("kl", 0.7, 0.9, 1)))))
    loaded = load_inputs([path])
    ours, notes = compute(loaded.entries, loaded.results)
    theirs = to_json(compare([path]))
    assert {m["method"] for f in ours["families"] for m in f["metrics"]} == {"paired bootstrap"}
    assert notes == [] and {**ours, "created": None} == {**theirs, "created": None}
