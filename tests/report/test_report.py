"""The report: pages and plots written atomically from generated results and run records."""

import json
import math

import pytest

from workbench.errors import UsageError
from workbench.formats.results import KIND, SCHEMA_VERSION, metric
from workbench.io import write_json
from workbench.formats.metrics import is_metric
from workbench.report.build import build_report
from workbench.report.tradeoff import FORGETTING, LEARNING, MC_RETENTION
from workbench.report.tables import SUMMARY, fmt, summary_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def reliability(shift: float) -> list[dict]:
    """Five equal-width bins; the middle one empty (NaN, as reliability_bins writes it)."""
    bins = []
    for i in range(5):
        lo, hi = i / 5, (i + 1) / 5
        empty = i == 2
        bins.append({"lo": lo, "hi": hi, "count": 0 if empty else 10,
                     "confidence": math.nan if empty else lo + 0.1,
                     "accuracy": math.nan if empty else min(1.0, lo + 0.1 + shift)})
    return bins


def entry(name, scale=1.0, ppl=1.03, val_loss=2.0, changes=True, run=None):
    metrics = {
        "learning.val_loss.base": metric(3.0), "learning.val_loss.tuned": metric(val_loss),
        "learning.exact_match.base": metric(0.1), "learning.exact_match.tuned": metric(0.1 + 0.4 * scale),
        "retention.general.ppl.ratio": metric(ppl, (ppl - 0.02, ppl + 0.02)),
        "retention.general.kl": metric(0.05 * scale),
        "retention.mc.all.acc.delta": metric(-0.01, (-0.03, 0.01)),
        "overfitting.mia.loss.auc": metric(0.5 + 0.1 * scale),
        "overfitting.mia.min_k.auc": metric(0.55),
        "calibration.all.ece.base": metric(0.04), "calibration.all.ece.tuned": metric(0.08),
    }
    curves = {"overfitting.mia.loss.roc": {"fpr": [0, 0.2, 0.5, 1], "tpr": [0, 0.4, 0.7, 1]},
              "overfitting.mia.min_k.roc": {"fpr": [0, 0.5, 1], "tpr": [0, 0.6, 1]},
              "calibration.all.reliability": {"base": reliability(0.0), "tuned": reliability(-0.1)}}
    return {"name": name, "adapter": f"runs/{name.split('@')[0]}/adapter", "run": run, "scale": scale,
            "changes_model": changes, "metrics": metrics, "curves": curves}


def results(entries) -> dict:
    return {"schema_version": SCHEMA_VERSION, "kind": KIND, "created": "2026-11-22T10:00:00+00:00",
            "suite": {"name": "tiny", "path": "evals/tiny.yaml", "fingerprint": "abc"},
            "base": {"model": "tiny-random-llama", "fingerprint": "def", "cache": "hit"},
            "versions": {"workbench": "0.1.0"}, "entries": entries}


def run_record(steps: int = 6) -> dict:
    history = [{"loss": 3.0 - 0.1 * s + 0.05 * s, "task_loss": 3.0 - 0.1 * s, "kl_to_base": 0.1 * s,
                "kl_to_base_weighted": 0.05 * s, "ewc": 0.2 * s, "ewc_weighted": 0.0 * s,
                "learning_rate": 1e-3, "epoch": s / steps, "step": s} for s in range(1, steps + 1)]
    history += [{"eval_loss": 2.6, "epoch": 0.5, "step": steps // 2},
                {"eval_loss": 2.4, "epoch": 1.0, "step": steps},
                {"train_loss": 2.7, "train_runtime": 1.0, "step": steps}]
    return {"schema_version": 1, "status": "completed", "recipe": {"name": "kl_ewc"},
            "penalties": ["kl_to_base", "ewc"], "history": history, "final": {"eval_loss": 2.4},
            "global_step": steps, "adapter": "adapter"}


@pytest.fixture
def inputs(tmp_path):
    """Two results files (a 3-scale sweep of "kl", and "baseline" plus a no-op adapter) and the
    sweep's run directory, named by its entries' "run" field relative to the results file."""
    write_json(tmp_path / "runs" / "kl" / "run.json", run_record())
    sweep = [entry("kl", 1.0, 1.03, 2.0, run="runs/kl"), entry("kl@0.25", 0.25, 1.005, 2.7, run="runs/kl"),
             entry("kl@0.5", 0.5, 1.012, 2.4, run="runs/kl")]
    other = [entry("baseline", ppl=1.2, val_loss=1.8), entry("noop", ppl=1.0, val_loss=3.0, changes=False)]
    other[0]["metrics"]["retention.general.kl"] = metric(math.nan)  # stored as None
    write_json(tmp_path / "kl.json", results(sweep))
    write_json(tmp_path / "base.json", results(other))
    return [tmp_path / "kl.json", tmp_path / "base.json"]


def test_writes_page_markdown_and_every_plot_as_png(inputs, tmp_path):
    out = tmp_path / "report"
    index = build_report(inputs, out)
    assert index == out / "index.html" and index.is_file() and (out / "report.md").is_file()
    names = ["kl", "kl-0.25", "kl-0.5", "baseline", "noop"]
    expected = {"tradeoff.png", "tradeoff-mc.png", "loss-kl.png"}
    expected |= {f"{kind}-{n}.png" for kind in ("reliability", "roc") for n in names}
    written = {p.name for p in (out / "plots").iterdir()}
    assert written == expected
    for name in expected:
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC, name
    html, md = index.read_text(), (out / "report.md").read_text()
    assert html.count("data:image/png;base64,") == len(expected)
    assert 'src="plots/' not in html  # self-contained: embedded, not linked
    assert all(f"](plots/{name})" in md for name in expected)


def test_page_names_every_entry_and_flags_the_adapter_that_changes_nothing(inputs, tmp_path):
    html = build_report(inputs, tmp_path / "out").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    for name in ("kl", "kl@0.25", "kl@0.5", "baseline", "noop"):
        assert f"<h3>{name}</h3>" in html and f"### {name}" in md
    assert "adapter changes nothing: noop" in html and "**adapter changes nothing**: noop" in md
    assert html.count('class="nothing"') == 1
    assert "<h3>runs/kl</h3>" in html and "penalties: kl_to_base, ewc" in html
    # one baseline point draws no front: the matched-learning table gives way to a note saying so
    assert "No matched-learning comparison: the reference family &#39;baseline&#39; has one point" in html


def test_tables_show_the_input_values_and_a_dash_when_missing(inputs, tmp_path):
    html = build_report(inputs, tmp_path / "out").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    for page in (html, md):
        assert "1.030 [1.010, 1.050]" in page  # ppl ratio [CI] of "kl"
        assert "-0.010 [-0.030, +0.010]" in page  # mc acc delta, signed
    baseline_row = next(line for line in md.splitlines() if line.startswith("| baseline |"))
    cells = [c.strip() for c in baseline_row.strip("|").split("|")]
    assert cells[:4] == ["baseline", "1", "1.800", "0.500"]
    assert cells[5] == "—"  # KL stored as None
    assert "| retention.general.ppl.ratio | 1.200 | [1.180, 1.220] |" in md


def test_explicit_run_dir_and_run_json_alone(tmp_path):
    write_json(tmp_path / "a" / "run.json", run_record())
    write_json(tmp_path / "b" / "run.json", {**run_record(), "status": "running", "history": None})
    index = build_report([tmp_path / "a", tmp_path / "b" / "run.json"], tmp_path / "out")
    html = index.read_text()
    assert (tmp_path / "out" / "plots" / "loss-a.png").read_bytes()[:8] == PNG_MAGIC
    assert "no loss history recorded" in html and "Summary" not in html


def test_clashing_names_are_prefixed_with_the_file_stem(tmp_path):
    write_json(tmp_path / "one.json", results([entry("kl"), entry("kl@0.5", 0.5)]))
    write_json(tmp_path / "two.json", results([entry("kl")]))
    build_report([tmp_path / "one.json", tmp_path / "two.json", tmp_path / "one.json"], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "### kl\n" in md and "### two:kl\n" in md and "### kl@0.5\n" in md
    assert md.count("\n### ") == 3  # a file given twice counts once


def test_kl_stands_in_for_forgetting_without_a_perplexity_ratio(tmp_path):
    only_kl = entry("kl<i>")
    del only_kl["metrics"]["retention.general.ppl.ratio"], only_kl["curves"]
    write_json(tmp_path / "r.json", results([only_kl]))
    html = build_report([tmp_path / "r.json"], tmp_path / "out").read_text()
    assert (tmp_path / "out" / "plots" / "tradeoff.png").read_bytes()[:8] == PNG_MAGIC
    assert "<h3>kl&lt;i&gt;</h3>" in html and "<i>" not in html  # autoescaped


def write_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    write_json(tmp_path / "other.json", {"some": "thing"})
    write_json(tmp_path / "old.json", {**results([entry("kl")]), "schema_version": 0})


@pytest.mark.parametrize("name", ["missing.json", "empty", "notes.txt", "other.json", "old.json"])
def test_bad_input_is_a_one_line_usage_error_naming_the_path(tmp_path, name):
    write_bad_inputs(tmp_path)
    with pytest.raises(UsageError) as info:
        build_report([tmp_path / name], tmp_path / "out")
    message = str(info.value)
    assert str(tmp_path / name) in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_no_input_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="at least one"):
        build_report([], tmp_path / "out")


def test_rerun_overwrites_cleanly_and_leaves_no_temp_files(inputs, tmp_path):
    out = tmp_path / "out"
    build_report(inputs, out)
    build_report(inputs[1:], out)  # no sweep, no run: their plots must go
    files = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert "plots/loss-kl.png" not in files and "plots/roc-kl-0.5.png" not in files
    assert "plots/roc-noop.png" in files
    assert not [f for f in files if f.endswith(".tmp") or "/." in f or f.startswith(".")]
    assert "kl@0.5" not in (out / "index.html").read_text()


def test_summary_table_is_fixed_width_text_with_every_entry(inputs):
    text = summary_table(json.loads(inputs[0].read_text()))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["entry", "scale"] and set(lines[1]) <= {"-", " "}
    assert [line.split()[0] for line in lines[2:]] == ["kl", "kl@0.25", "kl@0.5"]
    assert "1.030 [1.010, 1.050]" in lines[2]
    flagged = summary_table(json.loads(inputs[1].read_text()))
    assert "NO: adapter changes nothing" in flagged.splitlines()[-1]


def test_every_metric_the_report_names_is_in_the_catalogue():
    named = [name for _, name, *_ in SUMMARY] + [name for name, *_ in [*FORGETTING, MC_RETENTION]]
    named += [f"{prefix}.{side}" for prefix, _ in LEARNING for side in ("base", "tuned")]
    assert [name for name in named if not is_metric(name)] == []
    assert LEARNING[0][1].endswith("(lower is better)") and LEARNING[1][1].endswith("(higher is better)")


def test_fmt_is_compact_and_dashes_what_is_missing():
    assert [fmt(None), fmt(math.nan), fmt(1.03), fmt(-0.01, signed=True), fmt(1.2345e-5)] == \
        ["—", "—", "1.030", "-0.010", "1.23e-05"]


def test_the_training_curves_draw_the_probe_the_kl_budget_and_the_selected_step():
    """A run with a retention probe gets a third panel: the training-batch KL on every step, the
    probe's KL at its steps, the perplexity ratio on a right axis, the budgets (KL target, select's
    bound on the ratio) as horizontal lines and the selected checkpoint as a vertical line at its step."""
    from workbench.formats.run_record import RunRecord
    from workbench.report.plots import loss_figure

    record = run_record()
    record["recipe"] = {"name": "kl_ewc", "regularizers": {"kl_to_base": {"target": 0.3}}}
    for h in record["history"]:
        if "loss" in h:
            h["retention_train_kl"] = 0.05 * h["step"]
    record["history"] += [{"retention_kl": 0.02 * s, "retention_ppl_ratio": 1 + 0.01 * s, "step": s} for s in (3, 6)]
    record["selection"] = {"step": 3, "subject_to": {"retention_ppl_ratio": 1.05}}
    fig = loss_figure("kl_ewc", RunRecord(**record))
    losses, penalties, retention, ratio = fig.axes
    lines = {line.get_label(): line for line in retention.get_lines()}
    assert list(lines["KL to base, training batch"].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(lines["KL to base, general text (probe)"].get_ydata()) == pytest.approx([0.06, 0.12])
    assert list(lines["KL budget 0.3"].get_ydata()) == [0.3, 0.3]
    assert list(lines["selected: step 3"].get_xdata()) == [3, 3]
    assert list(ratio.get_lines()[0].get_ydata()) == pytest.approx([1.03, 1.06])
    assert list(ratio.get_lines()[1].get_ydata()) == [1.05, 1.05]  # the select budget on the ratio
    plain = loss_figure("kl_ewc", RunRecord(**run_record()))
    assert len(plain.axes) == 2  # no probe: no retention panel


def test_with_a_policy_the_page_opens_with_the_release_decision(inputs, tmp_path):
    """`report --policy`: the gate's decision before anything else, every check in a table (the
    failing ones first), the same verdict as `workbench gate`; without --policy no gate section."""
    from workbench.gate import check, load_policy
    from workbench.formats.results import load_results

    policy = tmp_path / "policy.yaml"
    policy.write_text("name: lenient\nrules:\n  - metric: retention.general.ppl.ratio\n    max: 1.1\n"
                      "    why: general text at most 10% worse\n")
    out = tmp_path / "report"
    page = build_report(inputs, out, policy=policy).read_text()
    markdown = (out / "report.md").read_text()
    assert page.index("Release gate: <span class=\"worse\">FAIL</span>") < page.index("<h2>Inputs</h2>")
    checks = [c for path in inputs for c in check(load_results(path), load_policy(policy))]
    failed = [c.entry for c in checks if c.status == "fail"]
    assert failed == ["baseline"]  # ppl ratio 1.2 > 1.1; kl, noop pass
    assert "gate lenient: FAIL (1 of 3 checks failed: baseline: retention.general.ppl.ratio = 1.2, not &lt;= 1.1)" in page
    assert markdown.index("## Release gate: FAIL") < markdown.index("## Forgetting at matched learning")
    rows = [line for line in markdown.splitlines() if line.startswith("| FAIL") or line.startswith("| PASS")]
    assert rows[0].startswith("| FAIL | baseline | `retention.general.ppl.ratio` | 1.2 | <= 1.1") and len(rows) == 3
    assert "Release gate" not in build_report(inputs, tmp_path / "plain").read_text()
