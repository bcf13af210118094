"""A comparison needs learning to compare at: a family whose learning span is a sliver of the
reference's, or a reference that barely moves from the base, gets "no comparison", in compare
and in the report alike. Negative control: the same family learning half as much as the
reference is compared."""

import json

import pytest

from tests.compare.build import KL, results, sweep, write
from workbench.cli import main
from workbench.report.build import build_report


def _family(tmp_path, reach: float, reference_reach: float = 1.0):
    """baseline: val loss 2.0 at the base to 2.0 - reference_reach tuned; 'small': to 2.0 - reach,
    forgetting a third of the baseline's at the same scale (it would look like it helps)."""
    data = results(sweep("baseline", learning=lambda s: 2.0 - reference_reach * s),
                   sweep("small", kl=lambda s: 0.2 * s * s / 3, learning=lambda s: 2.0 - reach * s))
    path = write(tmp_path, data)
    out = tmp_path / "compare.json"
    assert main(["compare", str(path), "--forgetting", KL, "--out", str(out)]) == 0
    family = json.loads(out.read_text())["families"][0]
    return path, family["metrics"][0]


@pytest.mark.parametrize("reach, expected", [
    (0.05, "no comparison: learns too little to compare (a learning span of 0.05, under 10% of the reference's 1)"),
    (0.5, None),  # compared: half the reference's learning is plenty
])
def test_a_family_that_learns_a_sliver_of_the_reference_is_not_judged(tmp_path, reach, expected):
    path, m = _family(tmp_path, reach)
    if expected is None:
        assert m["verdict"] != "no comparison" and all(r["difference"] for r in m["rows"]), m
        return
    assert m["verdict"] == "no comparison" and m["summary"] == expected and not m["rows"]
    page = build_report([path], tmp_path / "report").read_text()
    assert "learns too little to compare" in page and "helps at" not in page


def test_a_reference_that_barely_learns_judges_nothing(tmp_path):
    _, m = _family(tmp_path, reach=0.01, reference_reach=0.02)
    assert m["verdict"] == "no comparison"
    assert m["summary"] == ("no comparison: the reference learns too little to compare (learning moves 0.02 from 2, "
                            "under 2%)")
