"""The typed results entry, the compare.json and calibration.json readers: what they accept,
what they refuse in one line, and the one accessor for a metric's value and CI."""

import json
import math

import pytest

from workbench.errors import UsageError
from workbench.formats.calibration import read_calibration
from workbench.formats.comparison import read_comparison
from workbench.formats.results import Entry, Results, load_results, metric


def entry(**metrics):
    return {"name": "kl@0.5", "adapter": "runs/kl/adapter", "run": None, "scale": 0.5, "metrics": metrics}


def test_value_and_interval_are_none_when_absent_null_or_non_finite():
    e = Entry.model_validate(entry(a=metric(1.5, (1.0, 2.0)), b=metric(float("nan")),
                                   c={"value": 2, "ci": [None, 3]}, d=metric(float("inf"), (0.0, float("-inf")))))
    assert (e.value("a"), e.interval("a"), e.value("a", "ci_low"), e.value("a", "ci_high")) == (1.5, (1.0, 2.0), 1.0, 2.0)
    assert (e.value("b"), e.interval("b")) == (None, None)       # NaN is stored as null
    assert (e.value("c"), e.interval("c"), e.value("c", "ci_high")) == (2.0, None, 3.0)
    assert (e.value("d"), e.interval("d")) == (None, None)
    assert (e.value("missing"), e.interval("missing"), e.value("missing", "ci_low")) == (None, None, None)
    assert not math.isnan(e.value("a")) and e.family == "kl" and e.seed is None


@pytest.mark.parametrize("record, key", [(0.5, "metric x.y is not"), ({"value": True}, "metric x.y is not"),
                                         ({"value": "1"}, "metric x.y is not"), ({"ci": [0, 1]}, "metric x.y is not")])
def test_a_malformed_metric_is_one_line_naming_the_file_entry_and_metric(tmp_path, record, key):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"kind": "workbench.eval", "schema_version": 2, "entries": [entry(**{"x.y": record})]}))
    with pytest.raises(UsageError) as info:
        load_results(path)
    assert str(info.value).startswith(f"{path}: results entry 'kl@0.5': {key}") and "\n" not in str(info.value)


def test_a_seed_that_is_no_integer_is_refused():
    with pytest.raises(UsageError, match=r"^results entry 'kl@0.5': seed: "):
        Results.of({"entries": [{**entry(), "seed": "1"}]})


def test_schema_1_reads_and_a_written_file_reads_back_as_written(tmp_path):
    """A schema-1 entry (no family, seed or items) reads; a payload written and read back is the
    same JSON, a metric without a CI still without one."""
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"kind": "workbench.eval", "schema_version": 1, "entries": [entry(x=metric(1.0))]}))
    [e] = load_results(old).entries
    assert (e.family, e.items, e.source) == ("kl", None, old)
    data = {"schema_version": 2, "kind": "workbench.eval", "created": "t", "suite": {"fingerprint": "s"},
            "base": {}, "versions": {}, "entries": [{**entry(x=metric(1.0), y=metric(2.0, (1.0, 3.0))),
                                                     "family": "kl", "seed": 3, "step": 20, "light": False,
                                                     "changes_model": True, "delta_norm": 0.1, "curves": {},
                                                     "items": {"general": {"key": "k", "kl": [0.5]}}, "later": 1}]}
    Results.of(data).write(tmp_path / "new.json")
    assert json.loads((tmp_path / "new.json").read_text()) == data
    assert load_results(tmp_path / "new.json").fingerprint("suite") == "s"


def test_item_components_keep_only_whole_records():
    items = {"general": {"key": "k", "kl": [0.1, 0.2], "tokens": [3, 4]}, "target": {"key": "t", "tokens": [1, None]},
             "mc": {"arith": {"key": "m", "acc_base": [1, 0]}, "bad": {"acc_base": [1]}}}
    assert set(Entry.model_validate({**entry(), "items": items}).components()) == {"general", "mc.arith"}


def test_compare_and_calibration_files_are_checked_when_read(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"kind": "workbench.eval", "schema_version": 2}))
    with pytest.raises(UsageError, match=r"not a compare.json \(kind 'workbench.eval'.*it is a results file"):
        read_comparison(path, "report")
    with pytest.raises(UsageError, match=r"not a calibration.json"):
        read_calibration(path)
    path.write_text(json.dumps({"kind": "workbench.calibration", "schema_version": 1, "adapter": "a"}))
    with pytest.raises(UsageError, match=rf"^{path}: name: Field required"):
        read_calibration(path)
