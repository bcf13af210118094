"""The paired bootstrap of `workbench compare`: per-item scores resampled jointly across entries,
checked against a brute-force loop, a negative control (pairing broken) and files without items."""

import json
import math
import time

import numpy as np
import pytest

from tests.compare.build import KL, LEARNING, results, scored, sweep, synthetic_study, write
from workbench.cli import main
from workbench.compare.analysis import INDEPENDENT, PAIRED, UNPAIRED, compare
from workbench.compare.command import to_json
from workbench.compare.frontier import Point, interpolate, matched_levels, pareto_front
from workbench.compare.items import Resample, draw
from workbench.compare.paired import front_values

RATIO = "retention.general.ppl.ratio"
ACC = "retention.mc.all.acc.delta"
N_GENERAL, N_TARGET = 6, 5
GENERAL_TOKENS = np.array([100.0, 80, 120, 90, 110, 100])
GENERAL_BASE = np.array([2.0, 3.0, 2.5, 1.5, 2.2, 2.8])          # per token
SENSITIVITY = np.array([1.0, 0.2, 0.5, 2.0, 0.8, 1.2])            # how much a chunk forgets
TARGET_TOKENS = np.array([4.0, 6, 5, 3, 7])
TARGET_BASE = np.array([10.0, 12, 11, 9, 13])                     # per token
SPEED = np.array([1.0, 0.5, 1.5, 0.8, 1.2])                       # how fast an example is learned


def hand_entry(family, scale, learn, forget, wobble=0.0):
    """An entry whose chunk i loses forget * scale^2 * sensitivity_i (+ wobble on chunk 0) nats per
    token and whose example j gains learn * scale * speed_j."""
    per_tok = GENERAL_BASE + forget * scale ** 2 * SENSITIVITY + wobble * (np.arange(N_GENERAL) == 0)
    kl = forget * scale ** 2 * SENSITIVITY / 2
    general = {"tokens": GENERAL_TOKENS, "base_nll": GENERAL_BASE * GENERAL_TOKENS,
               "tuned_nll": per_tok * GENERAL_TOKENS, "kl": kl, "kl_upper": kl, "top1_agreement": 1 - kl / 10}
    tuned = TARGET_BASE - learn * scale * SPEED
    target = {"tokens": TARGET_TOKENS, "base_nll": TARGET_BASE * TARGET_TOKENS, "tuned_nll": tuned * TARGET_TOKENS}
    return scored(family, scale, general=general, target=target)


def hand_study():
    """baseline: 3 scales, learning 4 per token at full scale, forgetting 0.3; kl: a dominated
    middle point (scale 0.5 forgets more than 0.75 would suggest), less forgetting at full scale."""
    return ([hand_entry("baseline", s, 4.0, 0.3) for s in (0.4, 0.7, 1.0)]
            + [hand_entry("kl", s, 3.5, 0.2, wobble=0.4 if s == 0.5 else 0.0) for s in (0.5, 0.8, 1.0)])


def brute_force(entries, replicates, seed, levels=5):
    """The paired bootstrap written as a plain loop over replicates: resample the item indices,
    recompute every point, add the base, build fronts, read them at the matched levels."""
    general = draw(seed, "general:g", N_GENERAL, replicates)
    target = draw(seed, "target:t", N_TARGET, replicates)
    out = []
    for gi, ti in zip(general, target):
        fronts, spans = {}, {}
        for family in ("baseline", "kl"):
            points = []
            for e in (e for e in entries if e["family"] == family):
                g, t = e["items"]["general"], e["items"]["target"]
                tok, ttok = np.array(g["tokens"])[gi].sum(), np.array(t["tokens"])[ti].sum()
                x = np.array(t["tuned_nll"])[ti].sum() / ttok
                y = math.exp(np.array(g["tuned_nll"])[gi].sum() / tok - np.array(g["base_nll"])[gi].sum() / tok)
                points.append(Point(x, y))
            base_x = np.array(t["base_nll"])[ti].sum() / np.array(t["tokens"])[ti].sum()
            points.append(Point(base_x, 1.0))
            fronts[family] = pareto_front(points)
            spans[family] = (min(p.x for p in points), max(p.x for p in points))
        row = []
        for level in matched_levels(spans["baseline"], spans["kl"], levels):
            f, r = interpolate(fronts["kl"], level), interpolate(fronts["baseline"], level)
            row.append(np.nan if f is None or r is None else f.value - r.value)
        out.append(row)
    d = np.array(out)
    return [tuple(np.percentile(d[np.isfinite(d[:, k]), k], [2.5, 97.5])) for k in range(d.shape[1])]


def rows(report, family="kl", metric=RATIO):
    fam = next(f for f in report["families"] if f["family"] == family)
    return next(m for m in fam["metrics"] if m["metric"] == metric)


def widths(report):
    """CI width of every row with a difference of nonzero width, by (family, metric, level)."""
    return {(f["family"], m["metric"], r["level"]): r["difference"]["ci"][1] - r["difference"]["ci"][0]
            for f in report["families"] for m in f["metrics"] for r in m["rows"]
            if r["difference"] and r["difference"]["ci"][1] > r["difference"]["ci"][0]}


def median_ratio(a, b):
    shared = [k for k in a if k in b]
    return float(np.median([a[k] / b[k] for k in shared]))


# ---------------------------------------------------------------- the items


def test_items_reproduce_every_stated_metric():
    entries = synthetic_study(families=(("baseline", 1.0, 1.0, 1), ("kl", 0.7, 0.9, 1)))
    resample = Resample([e["items"] for e in entries], replicates=10)
    checked = 0
    for i, e in enumerate(entries):
        for name, record in e["metrics"].items():
            found = resample.point(i, name)
            if found is not None:
                assert found == pytest.approx(record["value"], rel=1e-6, abs=1e-9), name
                checked += 1
    assert checked > 90  # 8 entries: 9 general and 3 learning metrics each, 12 mc ones on the 2 full ones
    assert resample.point(0, "overfitting.loss_gap") is None  # not recomputable from items


def test_vectorised_fronts_read_as_pareto_front_and_interpolate():
    rng = np.random.default_rng(1)
    x, y = rng.random((200, 7)), rng.random((200, 7))
    levels = np.sort(rng.random((200, 3)), axis=1)
    got = front_values(x, y, levels)
    for b in range(200):
        front = pareto_front([Point(a, c) for a, c in zip(x[b], y[b])])
        for k in range(3):
            e = interpolate(front, levels[b, k])
            assert (np.isnan(got[b, k]) if e is None else got[b, k] == pytest.approx(e.value, abs=1e-12))


# ---------------------------------------------------------------- the bootstrap


def test_the_paired_ci_equals_a_brute_force_loop(tmp_path):
    entries = hand_study()
    path = write(tmp_path, results(entries))
    report = to_json(compare([path], forgetting=[RATIO], replicates=400, seed=3))
    found = rows(report)
    assert found["method"] == PAIRED and report["uncertainty"]["methods"] == [PAIRED]
    expected = brute_force(entries, 400, 3)
    assert len(found["rows"]) == len(expected) == 5
    for row, (lo, hi) in zip(found["rows"], expected):
        assert row["difference"]["ci"] == pytest.approx([lo, hi], rel=1e-9, abs=1e-12)
    assert found["rows"][0]["difference"]["ci"] == [0.0, 0.0]  # L1 is the base on both sides, every time


def test_breaking_the_pairing_widens_every_ci(tmp_path):
    """The negative control: the same items drawn apart for each entry (and the independent
    method) give wider CIs at every level past the base."""
    path = write(tmp_path, results(hand_study()))
    paired, unpaired, independent = (to_json(compare([path], forgetting=[RATIO, KL], method=m, replicates=400))
                                     for m in ("paired", "unpaired", "independent"))
    assert rows(unpaired)["method"] == UNPAIRED and rows(independent)["method"] == INDEPENDENT
    w, wu, wi = widths(paired), widths(unpaired), widths(independent)
    assert set(w) == {(f, m, f"L{k}") for f in ("kl",) for m in (RATIO, KL) for k in (2, 3, 4, 5)}
    assert all(w[k] < wu[k] for k in w) and all(w[k] < wi[k] for k in w)
    assert median_ratio(w, wu) < 0.5


def test_a_synthetic_study_narrows_by_pairing(tmp_path):
    """Shaped like the study (light points, three baseline seeds, multiple choice): pairing
    narrows the median CI; the verdicts' values are the data's whatever the method."""
    path = write(tmp_path, results(synthetic_study()))
    paired, independent, unpaired = (to_json(compare([path], method=m, replicates=500))
                                     for m in ("paired", "independent", "unpaired"))
    assert {m["method"] for f in paired["families"] for m in f["metrics"]} == {PAIRED}
    assert median_ratio(widths(paired), widths(independent)) < 0.8
    assert median_ratio(widths(paired), widths(unpaired)) < 0.8
    for a, b in zip(rows(paired)["rows"], rows(independent)["rows"]):
        assert a["difference"]["value"] == b["difference"]["value"]


def test_it_is_seeded(tmp_path):
    path = write(tmp_path, results(hand_study()))
    a, b, c = (to_json(compare([path], forgetting=[RATIO], replicates=200, seed=s)) for s in (0, 0, 1))
    assert rows(a)["rows"] == rows(b)["rows"] and rows(a)["rows"] != rows(c)["rows"]


def test_seeds_that_disagree_widen_the_ci(tmp_path):
    """Two seeds of kl whose forgetting differs by a third: their spread beyond the items' noise
    is added, as the independent method adds it, so the CI is wider than with equal seeds."""
    def study(spread):
        kl = [e | {"seed": k, "name": f"{e['name']}-s{k}"}
              for k, f in ((0, 0.2), (1, 0.2 + spread)) for e in (hand_entry("kl", s, 3.5, f) for s in (0.5, 1.0))]
        return results([hand_entry("baseline", s, 4.0, 0.3) for s in (0.4, 0.7, 1.0)], kl)

    same = to_json(compare([write(tmp_path, study(0.0), "a.json")], forgetting=[RATIO], replicates=400))
    apart = to_json(compare([write(tmp_path, study(0.07), "b.json")], forgetting=[RATIO], replicates=400))
    assert widths(apart)[("kl", RATIO, "L5")] > 1.5 * widths(same)[("kl", RATIO, "L5")]


def test_a_study_of_a_hundred_entries_takes_seconds(tmp_path):
    families = [("baseline", 1.0, 1.0, 3)] + [(f"r{i}", 0.5 + 0.05 * i, 0.8 + 0.02 * i, 1 + i % 2) for i in range(12)]
    entries = synthetic_study(families=families, scales=(0.2, 0.4, 0.6, 0.8, 1.0), n_mc=400)
    assert len(entries) >= 100
    path = write(tmp_path, results(entries))
    start = time.perf_counter()
    c = compare([path], replicates=1000)
    elapsed = time.perf_counter() - start
    print(f"{len(entries)} entries, 1000 replicates: {elapsed:.2f} s")
    assert all(m.method == PAIRED for f in c.families for m in f.metrics)
    assert elapsed < 20  # about 2 s alone on one core; the bound leaves room for a busy machine


# ---------------------------------------------------------------- falling back


def test_files_without_items_compare_as_before_and_say_so(tmp_path, capsys):
    path = write(tmp_path, results(sweep("baseline"), sweep("kl", shift=-0.1)))
    out = tmp_path / "compare.json"
    assert main(["compare", str(path), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert rows(report, metric=KL)["method"] == INDEPENDENT
    assert report["uncertainty"] == {"methods": [INDEPENDENT], "replicates": 0, "seed": 0}  # none drawn
    assert "CIs: independent normal" in capsys.readouterr().out


def test_one_entry_without_items_sends_the_whole_metric_back_to_independent_cis(tmp_path):
    entries = hand_study()
    del entries[-1]["items"]["general"]
    report = to_json(compare([write(tmp_path, results(entries))], forgetting=[RATIO], replicates=200))
    assert rows(report)["method"] == INDEPENDENT


def test_items_that_do_not_reproduce_their_entry_are_not_used(tmp_path):
    entries = hand_study()
    entries[1]["items"]["general"]["tuned_nll"][0] += 50.0  # an edited file: the items say otherwise
    report = to_json(compare([write(tmp_path, results(entries))], forgetting=[RATIO, KL], replicates=200))
    assert rows(report)["method"] == INDEPENDENT and rows(report, metric=KL)["method"] == PAIRED


def test_the_markdown_names_the_method(tmp_path):
    path = write(tmp_path, results(hand_study()))
    md = tmp_path / "compare.md"
    assert main(["compare", str(path), "--forgetting", RATIO, "--markdown", str(md)]) == 0
    assert "CIs: paired bootstrap over items (1000 replicates, seed 0" in md.read_text()


def test_learning_without_items_leaves_every_metric_independent(tmp_path):
    entries = hand_study()
    for e in entries:
        del e["items"]["target"]
    report = to_json(compare([write(tmp_path, results(entries))], forgetting=[RATIO, KL], replicates=200))
    assert {m["method"] for f in report["families"] for m in f["metrics"]} == {INDEPENDENT}
    assert LEARNING in entries[0]["metrics"]
