import json
import math
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

from workbench.errors import UsageError
from workbench.formats import metrics as catalogue
from workbench.gate import Policy, check, format_table, load_policy, passed, run_gate
from tests.helpers import repo

SHIPPED = sorted(Path(repo("evals/gates")).glob("*.yaml"))

# Passes evals/gates/release.yaml.
GOOD = {
    "learning.val_loss.delta": {"value": -0.4, "ci": [-0.5, -0.3]},
    "retention.general.ppl.ratio": {"value": 1.02, "ci": [1.01, 1.03]},
    "retention.mc.all.acc.delta": {"value": 0.0, "ci": [-0.008, 0.008]},
    "overfitting.mia.loss.auc": {"value": 0.52},
    "overfitting.mia.min_k.auc": {"value": 0.58},
    "overfitting.mia.loss_ratio.auc": {"value": 0.55},
    "overfitting.extraction.gap": {"value": 0.0},
    "calibration.all.ece.delta": {"value": 0.01, "ci": [0.0, 0.02]},
}


def entry(name="tiny", scale=1.0, metrics=None):
    return {"name": name, "adapter": f"runs/{name}/adapter", "run": None, "scale": scale,
            "changes_model": scale != 0, "metrics": dict(GOOD if metrics is None else metrics),
            "curves": {}}


def results(*entries):
    return {"schema_version": 1, "kind": "workbench.eval", "created": "2026-01-01T00:00:00+00:00",
            "suite": {"name": "t"}, "base": {"model": "tiny-random-llama"}, "versions": {},
            "entries": list(entries) or [entry()]}


def policy(*rules, **fields):
    return Policy.model_validate({"name": "t", "rules": list(rules), **fields})


def statuses(checks):
    return [(c.entry, c.metric, c.status) for c in checks]


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------- statuses and thresholds


def test_every_status_and_the_gate_verdict():
    pol = policy({"metric": "retention.general.ppl.ratio", "max": 1.05},
                 {"metric": "overfitting.mia.loss.auc", "max": 0.5},
                 {"metric": "learning.exact_match.delta", "min": 0.0},
                 {"metric": "learning.exact_match.delta", "min": 0.0, "missing": "skip"})
    checks = check(results(), pol)
    assert [c.status for c in checks] == ["pass", "fail", "missing", "skipped"]
    assert checks[1].observed == 0.52 and checks[1].threshold == "<= 0.5"
    assert checks[2].observed is None and checks[2].metric == "learning.exact_match.delta"
    assert not passed(checks) and not passed(checks[2:3])  # missing fails the gate
    assert passed([checks[0], checks[3]])                 # skipped does not


def test_a_malformed_metric_record_is_a_usage_error():
    res = results(entry(metrics={"a.b": 0.5}))
    with pytest.raises(UsageError, match=r"results entry 'tiny': metric a.b is not"):
        check(res, policy({"metric": "a.*", "max": 1}))


@pytest.mark.parametrize("value, bounds, ok", [
    (1.05, {"max": 1.05}, True),       # bounds are inclusive
    (1.0501, {"max": 1.05}, False),
    (-0.01, {"min": -0.01}, True),
    (-0.0101, {"min": -0.01}, False),
    (0.5, {"min": 0.0, "max": 1.0}, True),
    (1.5, {"min": 0.0, "max": 1.0}, False),
    (None, {"max": 1.05}, False),      # non-finite values are written as None: fail
    (float("nan"), {"max": 1.05}, False),
    (float("inf"), {"min": 0.0}, False),
])
def test_thresholds(value, bounds, ok):
    res = results(entry(metrics={"x.y": {"value": value}}))
    [c] = check(res, policy({"metric": "x.y", **bounds}))
    assert c.status == ("pass" if ok else "fail")
    assert c.observed == (value if value is not None and math.isfinite(value) else None)


def test_glob_expands_to_every_matching_metric():
    metrics = {**GOOD, "overfitting.mia.min_k.auc": {"value": 0.7}}
    rule = {"metric": "overfitting.mia.*.auc", "max": 0.6}
    checks = check(results(entry(metrics=metrics)), policy(rule))
    assert statuses(checks) == [("tiny", "overfitting.mia.loss.auc", "pass"),
                                ("tiny", "overfitting.mia.min_k.auc", "fail"),
                                ("tiny", "overfitting.mia.loss_ratio.auc", "pass")]
    assert {c.rule for c in checks} == {"overfitting.mia.*.auc <= 0.6"}
    [missing] = check(results(), policy({"metric": "overfitting.mia.*.tpr_at_1pct_fpr", "max": 0.1}))
    assert missing.status == "missing" and missing.metric == "overfitting.mia.*.tpr_at_1pct_fpr"


def test_at_reads_the_ci_bound_instead_of_the_value():
    metrics = {"retention.mc.all.acc.delta": {"value": 0.0, "ci": [-0.03, 0.02]}}
    res = results(entry(metrics=metrics))
    rule = {"metric": "retention.mc.all.acc.delta", "min": -0.01}
    [on_value] = check(res, policy(rule))
    [on_low] = check(res, policy({**rule, "at": "ci_low"}))
    [on_high] = check(res, policy({**rule, "at": "ci_high", "max": 0.01}))
    assert (on_value.status, on_value.observed) == ("pass", 0.0)
    assert (on_low.status, on_low.observed, on_low.at) == ("fail", -0.03, "ci_low")
    assert on_low.rule == "retention.mc.all.acc.delta[ci_low] >= -0.01"
    assert (on_high.status, on_high.observed) == ("fail", 0.02)


def test_a_none_ci_bound_fails():
    res = results(entry(metrics={"a.b": {"value": 1.0, "ci": [None, None]}}))
    [c] = check(res, policy({"metric": "a.b", "max": 2, "at": "ci_high"}))
    assert (c.status, c.observed) == ("fail", None)


def test_at_ci_on_a_metric_without_ci_names_the_policy_file_and_rule(tmp_path):
    path = write(tmp_path, "p.yaml", {"rules": [{"metric": "overfitting.mia.loss.auc", "max": 0.6},
                                                {"metric": "overfitting.mia.*.auc", "max": 0.6,
                                                 "at": "ci_high"}]})
    with pytest.raises(UsageError) as exc:
        check(results(), load_policy(path))
    message = str(exc.value)
    assert message.startswith(f"{path}: rules[1].at: ci_high needs a confidence interval")
    assert "overfitting.mia.loss.auc" in message and "\n" not in message


# ---------------------------------------------------------------- which entries


def sweep():
    return results(entry("tiny@0", 0.0), entry("tiny@0.5", 0.5), entry("tiny"), entry("kl"))


def gated(pol, names=None):
    return sorted({c.entry for c in check(sweep(), pol, names)})


def test_entries_default_to_scale_one_then_all_then_names_and_globs():
    rule = {"metric": "retention.general.ppl.ratio", "max": 1.05}
    assert gated(policy(rule)) == ["kl", "tiny"]
    assert gated(policy(rule, entries="all")) == ["kl", "tiny", "tiny@0", "tiny@0.5"]
    assert gated(policy(rule, entries=["tiny@*"])) == ["tiny@0", "tiny@0.5"]
    assert gated(policy(rule, entries="kl")) == ["kl"]
    assert gated(policy(rule, entries="all"), names=["tiny"]) == ["tiny"]  # --entry wins


def test_a_light_checkpoint_is_no_release_candidate_by_default():
    """A checkpoint scored on learning and general text only (light) has scale 1 but lacks the
    rest of the suite: the default leaves it out; naming it gates it."""
    checkpoint = {**entry("tiny:step2"), "light": True}
    data = results(entry("tiny"), checkpoint)
    rule = {"metric": "retention.general.ppl.ratio", "max": 1.05}
    assert sorted({c.entry for c in check(data, policy(rule))}) == ["tiny"]
    assert sorted({c.entry for c in check(data, policy(rule), ["tiny:*"])}) == ["tiny:step2"]


def test_unknown_entry_is_a_usage_error():
    rule = {"metric": "retention.general.ppl.ratio", "max": 1.05}
    with pytest.raises(UsageError, match=r"^--entry: no entry matches 'nope' \(results have: tiny@0, "):
        check(sweep(), policy(rule), ["nope"])
    with pytest.raises(UsageError, match=r"entries: no entry matches 'x\*'"):
        check(sweep(), policy(rule, entries=["x*"]))
    with pytest.raises(UsageError, match="no entry has scale 1.0"):
        check(results(entry("tiny@0", 0.0)), policy(rule))


# ---------------------------------------------------------------- table and run_gate


def test_table_is_plain_text_with_a_one_line_verdict():
    metrics = {**GOOD, "retention.general.ppl.ratio": {"value": 1.2},
               "overfitting.mia.loss.auc": {"value": None}}
    pol = policy({"metric": "retention.general.ppl.ratio", "max": 1.05, "why": "keep general text"},
                 {"metric": "overfitting.mia.*.auc", "max": 0.6},
                 {"metric": "learning.exact_match.delta", "min": 0, "missing": "skip"})
    text = format_table(check(results(entry(metrics=metrics)), pol), "release")
    assert text.isascii() and "\x1b" not in text
    lines = text.splitlines()
    assert lines[-1] == ("gate release: FAIL (2 of 5 checks failed: tiny: retention.general.ppl.ratio"
                         " = 1.2, not <= 1.05; tiny: overfitting.mia.loss.auc = non-finite, not <= 0.6)")
    cells = [[cell.strip() for cell in line.split("|")] for line in lines if "|" in line]
    assert cells[0] == ["status", "entry", "metric", "observed", "threshold", "why"]
    assert cells[1] == ["FAIL", "tiny", "retention.general.ppl.ratio", "1.2", "<= 1.05",
                        "keep general text"]
    assert cells[2] == ["FAIL", "tiny", "overfitting.mia.loss.auc", "n/a", "<= 0.6", ""]
    assert [row[0] for row in cells[1:]] == ["FAIL", "FAIL", "PASS", "PASS", "SKIPPED"]
    assert cells[-1][2:4] == ["learning.exact_match.delta", "-"]
    only_skipped = check(results(), policy(pol.rules[2].model_dump()))
    verdict = format_table(only_skipped, "x").splitlines()[-1]
    assert verdict == "gate x: PASS (0 checks passed, 1 skipped)"


def test_table_marks_the_ci_bound_read():
    res = results(entry(metrics={"retention.mc.all.acc.delta": {"value": 0.0, "ci": [-0.03, 0.02]}}))
    text = format_table(check(res, policy({"metric": "retention.mc.all.acc.delta", "min": -0.01,
                                           "at": "ci_low"})), "t")
    assert "retention.mc.all.acc.delta[ci_low] |    -0.03 | >= -0.01" in text
    assert "retention.mc.all.acc.delta[ci_low] = -0.03, not >= -0.01" in text.splitlines()[-1]


def test_run_gate_exit_codes(tmp_path, capsys):
    good = write(tmp_path, "good.json", json.dumps(results()))
    worse = {**GOOD, "learning.val_loss.delta": {"value": 0.1}}
    bad = write(tmp_path, "bad.json", json.dumps(results(entry(metrics=worse))))
    assert run_gate(good, repo("evals/gates/release.yaml")) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "gate release: PASS (7 checks passed)"
    assert run_gate(bad, repo("evals/gates/release.yaml")) == 1
    assert "learning.val_loss.delta = 0.1, not <= 0" in capsys.readouterr().out.splitlines()[-1]
    with pytest.raises(UsageError, match="results file not found"):
        run_gate(tmp_path / "none.json", repo("evals/gates/release.yaml"))
    with pytest.raises(UsageError, match="no entry matches 'nope'"):
        run_gate(good, repo("evals/gates/release.yaml"), ["nope"])


# ---------------------------------------------------------------- bad policies


RULE = {"metric": "retention.general.ppl.ratio", "max": 1.05}


@pytest.mark.parametrize("content, expected", [
    (None, "gate policy file not found"),
    ("rules:\n  - metric: a\n    max: [1, 2\n", "line 4: invalid YAML"),
    ("- just\n- a list\n", "a gate policy must be a mapping"),
    ({"rules": [RULE], "entires": "all"}, "unknown key 'entires' (did you mean 'entries'?)"),
    ({"rules": [RULE, RULE, {**RULE, "mxa": 1}]}, "unknown key 'rules[2].mxa' (did you mean 'max'?)"),
    ({"rules": [{**RULE, "max": "high"}]}, "rules[0].max: Input should be a valid number"),
    ({"rules": [{**RULE, "max": float("nan")}]}, "rules[0].max: Input should be a finite number"),
    ({"rules": [RULE, {"metric": "a.b"}]}, "rules[1]: rule on a.b needs min or max"),
    ({"rules": [{**RULE, "min": 2.0}]}, "rules[0]: min 2 is above max 1.05"),
    ({"rules": [{**RULE, "at": "ci_mid"}]}, "rules[0].at: Input should be 'value', 'ci_low' or"),
    ({"rules": [{**RULE, "missing": "ignore"}]}, "rules[0].missing: Input should be 'fail' or 'skip'"),
    ({"rules": [{"max": 1}]}, "missing required key 'rules[0].metric'"),
    ({"rules": []}, "rules: a policy needs at least one rule"),
    ({"name": "x"}, "missing required key 'rules'"),
    ({"rules": [RULE], "entries": []}, "entries: empty list"),
    ({"rules": "all"}, "rules: Input should be a valid list"),
])
def test_bad_policy_is_one_line_naming_file_and_key(tmp_path, content, expected):
    """The policy is read first, so the (absent) results file is never reached."""
    path = tmp_path / "bad.yaml" if content is None else write(tmp_path, "bad.yaml", content)
    with pytest.raises(UsageError) as exc:
        run_gate(tmp_path / "never_read.json", path)
    message = str(exc.value)
    assert message.startswith(f"{path}:") and expected in message
    assert "\n" not in message


# ---------------------------------------------------------------- shipped policies


def documented_metrics() -> list[str]:
    """One name per catalogued family, every membership score: what a policy may match."""
    return catalogue.examples()


def test_documented_metrics_cover_the_families_policies_use():
    names = documented_metrics()
    assert "retention.mc.all.acc.delta" in names and "overfitting.mia.loss_ratio.auc" in names
    assert "calibration.all.ece_adaptive.delta" in names and "learning.val_ppl.tuned" in names


@pytest.mark.parametrize("path", SHIPPED, ids=str)
def test_shipped_policies_load_and_name_documented_metrics(path):
    pol = load_policy(path)
    assert pol.name == path.stem and pol.description
    documented = documented_metrics()
    for rule in pol.rules:
        assert rule.why, f"{path}: {rule.metric} has no why"
        assert any(fnmatchcase(name, rule.metric) for name in documented), rule.metric


def test_release_policy_gates_what_the_release_needs():
    pol = load_policy(repo("evals/gates/release.yaml"))
    assert pol.entries is None  # the tuned adapters, not the scale sweep
    by_metric = {r.metric: r for r in pol.rules}
    assert by_metric["retention.general.ppl.ratio"].max == 1.05
    accuracy = by_metric["retention.mc.all.acc.delta"]
    assert (accuracy.min, accuracy.at) == (-0.01, "ci_low")
    assert by_metric["overfitting.mia.loss.auc"].max == 0.6
    assert by_metric["overfitting.mia.loss_ratio.auc"].max == 0.6
    assert by_metric["learning.val_loss.delta"].max == 0.0
    assert passed(check(results(), pol))


@pytest.mark.parametrize("metric, ok", [("retention.general.ppl.ratio", True), ("overfitting.mia.*.auc", True),
                                        ("retention.mc.movie_recommendation.acc.delta", True),
                                        ("retention.general.ppl.ratoi", False), ("overfit.mia.*.auc", False)])
def test_a_policy_file_names_catalogued_metrics(tmp_path, metric, ok):
    path = write(tmp_path, "p.yaml", {"rules": [{"metric": metric, "max": 1}]})
    if ok:
        assert load_policy(path).rules[0].metric == metric
        return
    with pytest.raises(UsageError, match=r"rules\[0\]\.metric: .* matches no results.json metric") as exc:
        load_policy(path)
    assert str(exc.value).startswith(str(path))
    if metric.endswith("ratoi"):
        assert "did you mean 'retention.general.ppl.ratio'" in str(exc.value)


# ---------------------------------------------------------------- for CI: JSON and JUnit


def test_gate_json_and_junit_carry_every_check_and_the_decision(tmp_path, capsys):
    """The decision through the command line as CI reads it: `--json -` is JSON only on standard
    output; `--json FILE` and `--junit FILE` sit beside the table. Counts are checked against
    the statuses one by one (a rule missing, one failing, one skipped)."""
    from xml.etree import ElementTree as ET

    from workbench.cli import main

    metrics = {k: v for k, v in GOOD.items() if k not in ("overfitting.mia.loss.auc", "calibration.all.ece.delta")}
    metrics["retention.general.ppl.ratio"] = {"value": 1.2, "ci": [1.1, 1.3]}
    bad = write(tmp_path, "bad.json", json.dumps(results(entry("a"), entry("b", metrics=metrics))))
    release = repo("evals/gates/release.yaml")
    assert main(["gate", str(bad), "--policy", release, "--json", "-"]) == 1
    decided = json.loads(capsys.readouterr().out)  # nothing but the JSON
    assert decided["kind"] == "workbench.gate" and decided["passed"] is False
    assert decided["entries"] == {"a": True, "b": False}
    assert decided["counts"] == {"pass": 7 + 4, "fail": 1, "missing": 1, "skipped": 1}
    by = {(c["entry"], c["metric"]): c for c in decided["checks"]}
    assert by["b", "retention.general.ppl.ratio"]["status"] == "fail"
    assert by["b", "retention.general.ppl.ratio"]["observed"] == 1.2
    assert by["b", "overfitting.mia.loss.auc"]["status"] == "missing"
    assert decided["verdict"].startswith("gate release: FAIL (2 of 14 checks failed")

    assert main(["gate", str(bad), "--policy", release, "--json", str(tmp_path / "g.json"),
                 "--junit", str(tmp_path / "g.xml")]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == decided["verdict"]  # the table is still printed
    assert {k: v for k, v in json.loads((tmp_path / "g.json").read_text()).items()} == decided
    suite = ET.parse(tmp_path / "g.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("14", "2", "1")
    failed = sorted((case.get("classname"), case.find("failure").get("message")) for case in suite
                    if case.find("failure") is not None)
    assert failed == [("b", "overfitting.mia.loss.auc missing (rule: missing: fail)"),
                      ("b", "retention.general.ppl.ratio = 1.2, not <= 1.05")]

    good = write(tmp_path, "good.json", json.dumps(results()))
    assert main(["gate", str(good), "--policy", release, "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
