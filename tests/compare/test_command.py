"""`workbench compare` end to end on hand-built results files: verdicts, directions, seeds, the
outputs, one-line errors with exit 2, and no torch."""

import json
import math
import subprocess
import sys

import pytest

from tests.compare.build import ACC, KL, LEARNING, SCALES, entry, results, sweep, write
from tests.helpers import REPO
from workbench.cli import main
from workbench.compare.analysis import compare, compare_metric
from workbench.compare.frontier import Point, pareto_front


def run(tmp_path, *groups, args=(), name="results.json"):
    """compare through the CLI; returns compare.json as a dict."""
    path = write(tmp_path, results(*groups), name)
    out = tmp_path / "compare.json"
    assert main(["compare", str(path), *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def metric_of(report, family, metric=KL):
    fam = next(f for f in report["families"] if f["family"] == family)
    return next(m for m in fam["metrics"] if m["metric"] == metric)


# ---------------------------------------------------------------- verdicts


def test_a_front_shifted_down_by_a_tenth_helps_by_a_tenth(tmp_path, capsys):
    report = run(tmp_path, sweep("baseline"), sweep("kl", shift=-0.1))
    kl = metric_of(report, "kl")
    assert kl["verdict"] == "helps" and kl["summary"] == "helps at L1..L5"
    for row in kl["rows"]:
        assert row["difference"]["value"] == pytest.approx(-0.1)
        lo, hi = row["difference"]["ci"]
        assert lo < -0.1 < hi < 0  # a CI around -0.1 that excludes zero
        assert row["verdict"] == "helps"
    assert [lv["learning"] for lv in report["families"][0]["levels"]] == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0])
    table = capsys.readouterr().out
    assert "kl: retention.general.kl: helps at L1..L5" in table and "vs training less" in table


def test_an_identical_family_is_no_different(tmp_path):
    report = run(tmp_path, sweep("baseline"), sweep("same"))
    same = metric_of(report, "same")
    assert same["verdict"] == "no different"
    assert all(r["verdict"] == "no different" and r["ci"][0] < 0 < r["ci"][1]
               for r in ({**r, "ci": r["difference"]["ci"]} for r in same["rows"]))


def test_a_family_that_learns_less_is_compared_only_where_it_reaches(tmp_path):
    """'short' learns down to val loss 1.5 only; the reference reaches 1.0. Its levels span
    [1.5, 2.0]: nothing is said about 1.0-1.5, where it would have to be extrapolated."""
    short = sweep("short", learning=lambda s: 2.0 - 0.5 * s, kl=lambda s: 0.05 * s)
    report = run(tmp_path, sweep("baseline"), short)
    fam = report["families"][0]
    assert fam["span"] == pytest.approx([1.5, 2.0]) and report["reference"]["span"] == pytest.approx([1.0, 2.0])
    assert min(lv["learning"] for lv in fam["levels"]) == pytest.approx(1.5)


def test_a_level_the_family_never_reaches_has_no_comparison():
    """Read at explicit levels, past the family's best learning there is no row value, not an
    extrapolation of its last segment."""
    ref = [pareto_front([Point(1.0, 0.2), Point(1.5, 0.05), Point(2.0, 0.0)])]
    fam = [pareto_front([Point(1.5, 0.01), Point(2.0, 0.0)])]
    rows = compare_metric(ref, fam, [2.0, 1.5, 1.25, 1.0], learning_higher=False)
    assert [r.diff is not None for r in rows] == [True, True, False, False]
    assert rows[2].family is None and rows[2].reference.value == pytest.approx(0.125)
    assert rows[2].note == "the family's front does not reach this learning"


def test_a_front_shorter_than_its_points_reports_no_comparison_at_that_level(tmp_path):
    """An accuracy delta the tuned model improves (+0.01 at scale 0.25) dominates the base
    point, so the reference's accuracy front stops at val loss 1.75; at 2.0 nothing is compared."""
    acc = {0.0: 0.0, 0.25: 0.01, 0.5: -0.01, 0.75: -0.02, 1.0: -0.04}
    ref = [entry("baseline", s, 2.0 - s, {KL: 0.2 * s * s, ACC: acc[s]}) for s in SCALES]
    fam = [entry("kl", s, 2.0 - s, {KL: 0.2 * s * s, ACC: -0.01 * s}) for s in SCALES]
    report = run(tmp_path, ref, fam)
    rows = metric_of(report, "kl", ACC)["rows"]
    assert rows[0]["learning"] == 2.0 and rows[0]["verdict"] is None and rows[0]["difference"] is None
    assert rows[0]["reference"] is None and rows[0]["family"]["value"] == 0.0
    assert rows[0]["note"] == "the reference's front does not reach this learning"
    assert [r["verdict"] for r in rows] == [None, "worse", "helps", "helps", "helps"]
    assert metric_of(report, "kl", ACC)["summary"] == "worse at L2; helps at L3..L5"


# ---------------------------------------------------------------- directions


def test_an_accuracy_delta_above_the_reference_helps(tmp_path):
    """retention.mc.<task>.acc.delta is higher-is-better: above the reference forgets less."""
    ref = [entry("baseline", s, 2.0 - s, {ACC: -0.04 * s}) for s in SCALES]
    fam = [entry("kl", s, 2.0 - s, {ACC: -0.04 * s + 0.02}) for s in SCALES]
    worse = [entry("bad", s, 2.0 - s, {ACC: -0.04 * s - 0.02}) for s in SCALES]
    report = run(tmp_path, ref, fam, worse, args=["--forgetting", ACC])
    kl = metric_of(report, "kl", ACC)
    assert kl["higher_is_better"] and kl["verdict"] == "helps"
    assert all(r["difference"]["value"] == pytest.approx(0.02) and r["difference"]["ci"][0] > 0
               for r in kl["rows"])
    assert metric_of(report, "bad", ACC)["verdict"] == "worse"


def test_a_higher_is_better_learning_metric_works(tmp_path):
    """learning.exact_match.tuned: the levels are exact-match values, least learning first."""
    def fam(name, shift):
        return [entry(name, s, 2.0 - s, {KL: 0.2 * s * s + shift}) | {"metrics": {
            "learning.exact_match.tuned": {"value": 0.1 + 0.5 * s, "ci": [0.099 + 0.5 * s, 0.101 + 0.5 * s]},
            KL: {"value": 0.2 * s * s + shift, "ci": [0.2 * s * s + shift - 0.002, 0.2 * s * s + shift + 0.002]}}}
            for s in SCALES]
    report = run(tmp_path, fam("baseline", 0.0), fam("kl", -0.1),
                 args=["--learning", "learning.exact_match.tuned", "--forgetting", KL])
    assert report["learning"] == {"metric": "learning.exact_match.tuned", "higher_is_better": True}
    assert [lv["learning"] for lv in report["families"][0]["levels"]] == pytest.approx([0.1, 0.225, 0.35, 0.475, 0.6])
    assert metric_of(report, "kl")["verdict"] == "helps"


# ---------------------------------------------------------------- seeds and merging


def test_seed_spread_widens_the_ci_by_hand(tmp_path):
    """Both 'one' and 'two' sit 0.1 below the reference on average. 'two' has seeds at -0.2 and
    0.0: S^2 = 0.02, so the family's se = sqrt(0.02 / 2) = 0.1 (the item variance, ~1e-6, is
    below S^2 and absorbed), and the CI, +-1.96 * 0.1, spans zero."""
    ref = sweep("baseline")
    one = sweep("one", shift=-0.1)
    two = sweep("two", shift=-0.2, seed=0) + sweep("two", shift=0.0, seed=1)
    report = run(tmp_path, ref, one, two)
    l3_one, l3_two = metric_of(report, "one")["rows"][2], metric_of(report, "two")["rows"][2]
    assert l3_two["family"]["n_seeds"] == 2 and l3_two["family"]["value"] == pytest.approx(-0.05)
    assert l3_two["family"]["se"] == pytest.approx(0.1)
    assert l3_two["difference"]["value"] == pytest.approx(l3_one["difference"]["value"]) == pytest.approx(-0.1)
    lo, hi = l3_two["difference"]["ci"]
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.01 + l3_one["reference"]["se"] ** 2))
    assert l3_one["verdict"] == "helps" and l3_two["verdict"] == "no different"
    assert report["families"][1]["seeds"] == [0, 1] and report["families"][1]["points"] == 10


def test_files_are_merged_and_old_entries_take_their_family_from_the_name(tmp_path):
    a = write(tmp_path, results(sweep("baseline", legacy=True)), "a.json")
    b = write(tmp_path, results(sweep("kl", shift=-0.1, legacy=True)), "b.json")
    out, md = tmp_path / "c.json", tmp_path / "c.md"
    assert main(["compare", str(a), str(b), "--out", str(out), "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "workbench.compare" and report["schema_version"] == 1
    assert report["inputs"] == [str(a), str(b)] and report["reference"]["family"] == "baseline"
    assert metric_of(report, "kl")["verdict"] == "helps"
    text = md.read_text()
    assert text.startswith("# Forgetting at matched learning") and "| `retention.general.kl` | L1 |" in text
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file and renamed


def test_default_forgetting_takes_every_accuracy_delta_present_and_flags_value_only(tmp_path):
    tasks = ("arc", "boolq")
    def fam(name, shift):
        return [entry(name, s, 2.0 - s, {KL: 0.2 * s * s + shift, "retention.general.ppl.ratio": 1 + s,
                                         **{f"retention.mc.{t}.acc.delta": -0.02 * s for t in tasks}}, half=None)
                for s in SCALES]
    report = run(tmp_path, fam("baseline", 0), fam("kl", -0.1))
    assert [m["metric"] for m in report["forgetting"]] == ["retention.general.ppl.ratio", KL,
                                                          "retention.mc.arc.acc.delta", "retention.mc.boolq.acc.delta"]
    row = metric_of(report, "kl")["rows"][0]
    assert row["family"]["value_only"] and row["family"]["se"] == 0  # no CI: se 0, and it says so


def test_the_table_and_markdown_mark_value_only_estimates(tmp_path, capsys):
    md = tmp_path / "c.md"
    run(tmp_path, sweep("baseline", half=None), sweep("kl", shift=-0.1, half=None), args=["--markdown", str(md)])
    assert "* rests on a metric with no CI in results.json: its se is taken as 0" in capsys.readouterr().out
    assert "| 0.2 ± 0\\* | 0.1 ± 0\\* |" in md.read_text()  # escaped: a bare * would start emphasis


# ---------------------------------------------------------------- bad input: exit 2, one line


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def no_reference(tmp_path):
    path = write(tmp_path, results(sweep("kl"), sweep("baseln")))
    return [str(path)], [str(path), "no family named 'baseline'", "did you mean 'baseln'", "families: kl, baseln",
                         "--reference"]


def misspelt_reference(tmp_path):
    path = write(tmp_path, results(sweep("baseline"), sweep("kl")))
    return [str(path), "--reference", "basline"], ["--reference", "'basline'", "did you mean 'baseline'"]


def learning_missing(tmp_path):
    kl = sweep("kl")
    for e in kl[3:]:
        del e["metrics"][LEARNING]
    path = write(tmp_path, results(sweep("baseline"), kl))
    return [str(path)], [str(path), LEARNING, "2 of 10 entries", "kl@0.75, kl@1"]


def one_point(tmp_path):
    path = write(tmp_path, results(sweep("baseline"), entry("solo", 1.0, 1.0, {KL: 0.1})))
    return [str(path)], [str(path), "family 'solo' has one point (solo@1)", "front"]


def one_point_seed(tmp_path):
    path = write(tmp_path, results(sweep("baseline"), sweep("kl"), entry("kl", 1.0, 1.0, {KL: 0.1}, seed=3)))
    return [str(path)], ["family 'kl' seed 3 has one point"]


def unknown_learning(tmp_path):
    path = write(tmp_path, results(sweep("baseline"), sweep("kl")))
    return [str(path), "--learning", "learning.val_los.tuned"], [
        "--learning", "'learning.val_los.tuned' is not a results.json metric", "did you mean 'learning.val_loss.tuned'"]


def unknown_forgetting(tmp_path):
    path = write(tmp_path, results(sweep("baseline"), sweep("kl")))
    return [str(path), "--forgetting", "retention.general.kll"], ["--forgetting", "'retention.general.kll'"]


def no_direction(tmp_path):
    path = write(tmp_path, results(sweep("baseline"), sweep("kl")))
    return [str(path), "--forgetting", "overfitting.train_loss.tuned"], ["--forgetting", "no better direction"]


def forgetting_absent(tmp_path):
    path = write(tmp_path, results(sweep("baseline"), sweep("kl")))
    return [str(path), "--forgetting", ACC], [str(path), ACC, "10 of 10 entries"]


def missing_file(tmp_path):
    return [str(tmp_path / "nope.json")], ["nope.json", "not found"]


def only_reference(tmp_path):
    path = write(tmp_path, results(sweep("baseline")))
    return [str(path)], ["only the reference family 'baseline'"]


def different_suites(tmp_path):
    a = write(tmp_path, results(sweep("baseline"), fingerprint="aaa"), "a.json")
    b = write(tmp_path, results(sweep("kl"), fingerprint="bbb"), "b.json")
    return [str(a), str(b)], [str(b), "suite fingerprint bbb differs", "a.json"]


def too_few_levels(tmp_path):
    path = write(tmp_path, results(sweep("baseline"), sweep("kl")))
    return [str(path), "--levels", "1"], ["--levels"]


BAD = [no_reference, misspelt_reference, learning_missing, one_point, one_point_seed, unknown_learning,
       unknown_forgetting, no_direction, forgetting_absent, missing_file, only_reference, different_suites,
       too_few_levels]


@pytest.mark.parametrize("bad", BAD, ids=lambda f: f.__name__)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, bad):
    args, expected = bad(tmp_path)
    out = tmp_path / "compare.json"
    assert main(["compare", *args, "--out", str(out)]) == 2
    line = one_error_line(capsys)
    for part in expected:
        assert part in line, line
    assert not out.exists()


def test_out_as_a_directory_is_refused(tmp_path, capsys):
    path = write(tmp_path, results(sweep("baseline"), sweep("kl")))
    assert main(["compare", str(path), "--out", str(tmp_path)]) == 2
    assert "--out is a directory" in one_error_line(capsys)


def test_the_analysis_raises_usage_errors_too(tmp_path):
    from workbench.errors import UsageError

    path = write(tmp_path, results(sweep("baseline"), sweep("kl")))
    with pytest.raises(UsageError, match="--reference"):
        compare([path], reference="nope")


# ---------------------------------------------------------------- no torch


def _fresh(argv):
    code = ("import json, sys\nfrom workbench.cli import main\n"
            f"try:\n    code = main({argv!r})\nexcept SystemExit as exc:\n    code = exc.code\n"
            "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules,\n"
            "                  'heavy': sorted(m for m in sys.modules if m.startswith(('workbench.training', "
            "'workbench.evals', 'transformers')))}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_compare_loads_no_torch(tmp_path):
    path = write(tmp_path, results(sweep("baseline"), sweep("kl", shift=-0.1)))
    assert _fresh(["compare", "--help"]) == {"code": 0, "torch": False, "heavy": []}
    assert _fresh(["compare", str(path), "--out", str(tmp_path / "c.json"),
                   "--markdown", str(tmp_path / "c.md")]) == {"code": 0, "torch": False, "heavy": []}


def test_a_family_with_no_learning_in_common_is_not_compared(tmp_path):
    far = sweep("far", learning=lambda s: 3.0 - s)  # val loss 2.0..3.0; the reference 1.0..2.0 touch at 2.0
    farther = sweep("farther", learning=lambda s: 4.0 - s)
    report = run(tmp_path, sweep("baseline"), far, farther)
    assert [lv["learning"] for lv in report["families"][0]["levels"]] == [2.0]
    farther = metric_of(report, "farther")
    assert farther["verdict"] == "no comparison" and farther["rows"] == []
    assert farther["summary"] == "no comparison: learning 3..4 does not meet the reference's 1..2"


def with_base(entries, base_loss=3.0):
    """The entries as an eval writes them: each with the base's own val loss beside the tuned one."""
    for e in entries:
        e["metrics"]["learning.val_loss.base"] = {"value": base_loss}
    return entries


def test_the_base_is_every_family_s_free_origin(tmp_path):
    """A reference that learns more everywhere (val loss 1.0..1.5) and a family that learns less
    (2.0..2.5, forgetting more than the reference's line to the base) share no learning level
    among their own points; any adapter scaled to 0 is the base (val loss 3.0, KL 0) exactly, so
    both fronts reach it and the family is compared, and found worse, between 2.0 and 3.0."""
    reference = with_base(sweep("baseline", kl=lambda s: 0.4 * s, learning=lambda s: 1.5 - 0.5 * s,
                                scales=(0.5, 0.75, 1.0)))
    family = with_base(sweep("kl", kl=lambda s: 0.3 + 0.1 * s, learning=lambda s: 2.5 - 0.5 * s,
                             scales=(0.5, 0.75, 1.0)))
    report = run(tmp_path, reference, family)
    kl = metric_of(report, "kl")
    assert kl["verdict"] == "worse"
    levels = [lv["learning"] for lv in report["families"][0]["levels"]]
    assert min(levels) == pytest.approx(2.0) and max(levels) == pytest.approx(3.0)
    # at the base itself the two are the same model: no difference, exactly
    at_base = next(r for r in kl["rows"] if r["learning"] == pytest.approx(3.0))
    assert at_base["difference"] == {"value": 0.0, "se": 0.0, "ci": [0.0, 0.0]}


def test_a_family_that_learns_nothing_past_the_base_is_not_compared(tmp_path):
    """Every point above the base's val loss (a recipe that only unlearned): the fronts meet at
    the base alone, where any two families differ by exactly 0, so no verdict is given there."""
    reference = with_base(sweep("baseline", kl=lambda s: 0.4 * s, learning=lambda s: 3.0 - s,
                                scales=(0.5, 1.0)))
    unlearned = with_base(sweep("kl", kl=lambda s: 5.0 * s, learning=lambda s: 3.0 + s, scales=(0.5, 1.0)))
    kl = metric_of(run(tmp_path, reference, unlearned), "kl")
    assert kl["verdict"] == "no comparison" and kl["rows"] == []
    assert kl["summary"].startswith("no comparison: no point learns past the base")
    # negative control: one point that learns a little is enough to be compared, and found worse
    barely = with_base(sweep("kl", kl=lambda s: 5.0 * s, learning=lambda s: 3.0 - 0.2 * s, scales=(0.5, 1.0)))
    assert metric_of(run(tmp_path, reference, barely), "kl")["verdict"] == "worse"


def test_without_the_base_value_no_origin_is_invented(tmp_path):
    """Entries that do not say the base's val loss get no base point: the fronts stay apart."""
    reference = sweep("baseline", kl=lambda s: 0.4 * s, learning=lambda s: 1.5 - 0.5 * s, scales=(0.5, 0.75, 1.0))
    family = sweep("kl", kl=lambda s: 0.3 + 0.1 * s, learning=lambda s: 2.5 - 0.5 * s, scales=(0.5, 0.75, 1.0))
    assert metric_of(run(tmp_path, reference, family), "kl")["verdict"] == "no comparison"


def light(entries):
    """The entries as an eval with light_points writes them: only the final adapter (scale 1)
    carries the accuracy delta; every other point is light and lacks it."""
    for e in entries:
        e["light"] = e["scale"] != 1.0
        if e["light"]:
            del e["metrics"][ACC]
    return entries


def test_light_points_are_points_only_for_the_metrics_they_carry(tmp_path):
    """Accuracy deltas exist on the final adapters only (and the base, as every family's origin):
    each front for it is the segment base (val loss 2, delta 0) -> final (val loss 1). The
    baseline's final loses 0.1, the family's 0.04, so at level x the fronts read -0.1 (2 - x) and
    -0.04 (2 - x), and the family helps by 0.06 (2 - x): by hand at L1..L5 (x = 2.0 .. 1.0)."""
    def fam(name, acc):
        return light(with_base([entry(name, s, 2.0 - s, {KL: 0.2 * s * s, ACC: acc * s}) for s in SCALES],
                               base_loss=2.0))
    report = run(tmp_path, fam("baseline", -0.1), fam("kl", -0.04))
    assert [m["metric"] for m in report["forgetting"]] == ["retention.general.kl", ACC]
    rows = metric_of(report, "kl", ACC)["rows"]
    assert [r["learning"] for r in rows] == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0])
    assert [r["difference"]["value"] for r in rows] == pytest.approx([0.06 * (2 - r["learning"]) for r in rows])
    assert metric_of(report, "kl", ACC)["summary"] == "helps at L2..L5"  # at L1 both are the base

    # negative control: the same entries without the light mark are entries missing a metric, and
    # the default leaves the accuracy delta out
    plain = [fam("baseline", -0.1), fam("kl", -0.04)]
    for e in plain[0] + plain[1]:
        del e["light"]
    report = run(tmp_path, *plain, name="plain.json")
    assert [m["metric"] for m in report["forgetting"]] == ["retention.general.kl"]
    assert report["forgetting_left_out"] == [ACC]


def test_a_full_entry_missing_a_requested_metric_is_still_refused(tmp_path, capsys):
    def fam(name):
        return light([entry(name, s, 2.0 - s, {KL: 0.2 * s * s, ACC: -0.1 * s}) for s in SCALES])
    baseline, family = fam("baseline"), fam("kl")
    del family[-1]["metrics"][ACC]  # the final adapter, scored on the whole suite, lacks it
    path = write(tmp_path, results(baseline, family))
    assert main(["compare", str(path), "--forgetting", ACC]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--forgetting {ACC} is missing or non-finite in 1 of 2 entries: kl@1" in err


def test_the_markdown_opens_with_one_verdict_row_per_family(tmp_path):
    """The overview: per family and metric the verdict, where, and the difference at the most
    learning both fronts reach (L5 here, val loss 1.0: exactly -0.1 for the shifted family)."""
    path = write(tmp_path, results(sweep("baseline"), sweep("kl", shift=-0.1), sweep("same")))
    md = tmp_path / "compare.md"
    assert main(["compare", str(path), "--markdown", str(md)]) == 0
    text = md.read_text()
    overview = text[text.index("## Verdicts"):text.index("## kl")]
    rows = [line for line in overview.splitlines() if line.startswith("| ")]
    assert rows[0] == "| family | points | seeds | `retention.general.kl` |"
    assert rows[1].startswith("| kl | 5 | 0 | **helps** (helps at L1..L5); -0.1 [-0.1")
    assert rows[1].endswith("] at L5 |")
    assert rows[2].startswith("| same | 5 | 0 | **no different**; +0 [-0.00") and rows[2].endswith("] at L5 |")


def test_learning_is_taken_as_measured_whatever_its_ci(tmp_path):
    """Points share their held-out examples, so a learning CI does not widen the comparison: the
    same families with a wide CI on val loss (±0.5) give the same differences and CIs as with a
    narrow one, and carried as independent noise the learning se would have widened them."""
    def fams(half):
        return [sweep("baseline", half=half), sweep("kl", shift=-0.1, half=half)]
    def widen_learning(groups, half):
        for e in groups[0] + groups[1]:
            x = e["metrics"][LEARNING]["value"]
            e["metrics"][LEARNING]["ci"] = [x - half, x + half]
        return groups
    narrow = run(tmp_path, *fams(0.00196), name="narrow.json")
    wide = run(tmp_path, *widen_learning(fams(0.00196), 0.5), name="wide.json")
    rows = [metric_of(r, "kl")["rows"] for r in (narrow, wide)]
    assert [r["difference"] for r in rows[0]] == [r["difference"] for r in rows[1]]
    # negative control: the delta method with the learning se through the front's slope (0.4 at
    # full scale for kl = 0.2 s^2) would add (0.4 * 0.5 / 1.96)^2 to a variance of about 2e-6
    se = rows[1][-1]["difference"]["se"]
    assert se < 0.01 < 0.4 * 0.5 / 1.96
