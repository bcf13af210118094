"""`workbench summarize`: the DerSimonian-Laird pool against hand-computed numbers, its
fixed-effect limit, cells left out of the pool, one-line errors with exit 2, and end to end on
cells that `workbench compare --out` wrote from tests/compare/build.py's results."""

import json
import math

import pytest

from tests.compare.build import KL, results, sweep, synthetic_study, write
from workbench.cli import main
from workbench.compare.pooling import dersimonian_laird
from workbench.compare.summarize import pooled_verdict

Z = 1.96


# ---------------------------------------------------------------- the pool


def test_dersimonian_laird_equals_the_hand_computed_case():
    """Three cells, d = (-0.3, -0.1, 0.0), se = (0.1, 0.1, 0.2).

    Fixed-effect weights v = 1/se^2 = (100, 100, 25), sum v = 225;
    m = (-30 - 10 + 0) / 225 = -8/45;
    Q = 100 (-0.3 + 8/45)^2 + 100 (-0.1 + 8/45)^2 + 25 (8/45)^2
      = 100 * 121/8100 + 100 * 49/8100 + 25 * 256/8100 = 23400/8100 = 26/9 (2.889, on 2 df);
    sum v^2 / sum v = (10000 + 10000 + 625) / 225 = 91.667, so c = 225 - 91.667 = 400/3;
    tau^2 = (26/9 - 2) / (400/3) = (8/9) (3/400) = 1/150 = 0.006667;
    w = 1/(se^2 + tau^2) = 1/(0.01 + 1/150) = 60, 60, 1/(0.04 + 1/150) = 150/7; sum w = 990/7;
    mu = (60 (-0.3) + 60 (-0.1) + 0) / (990/7) = -24 * 7/990 = -0.169697;
    se = sqrt(7/990) = 0.084087; CI = -0.169697 -+ 0.164811 = [-0.334508, -0.004886];
    I^2 = (26/9 - 2) / (26/9) = 8/26 = 0.3077."""
    p = dersimonian_laird([-0.3, -0.1, 0.0], [0.1, 0.1, 0.2])
    assert p.q == pytest.approx(26 / 9)
    assert p.tau2 == pytest.approx(1 / 150)
    assert p.value == pytest.approx(-168 / 990)
    assert p.se == pytest.approx(math.sqrt(7 / 990))
    assert (p.lo, p.hi) == pytest.approx((-0.334508, -0.004886), abs=1e-6)
    assert p.i2 == pytest.approx(8 / 26) and p.k == 3


def test_cells_that_agree_pool_to_the_fixed_effect_mean():
    """The same difference in every cell: Q = 0, tau^2 = 0, and the pool is the inverse-variance
    mean with se 1/sqrt(sum 1/se^2) = 1/sqrt(100 + 25 + 400) = 0.043644."""
    p = dersimonian_laird([-0.1, -0.1, -0.1], [0.1, 0.2, 0.05])
    assert p.tau2 == 0 and p.q == pytest.approx(0, abs=1e-12) and p.i2 == 0
    assert p.value == pytest.approx(-0.1) and p.se == pytest.approx(1 / math.sqrt(525))
    # Spread within the noise is clipped to tau^2 = 0: v = 100 each, m = -0.1, Q = 2 * 100 *
    # 0.01^2 = 0.02 < k - 1 = 1, so the pool is the fixed-effect mean -0.1 with se 1/sqrt(200)
    p = dersimonian_laird([-0.11, -0.09], [0.1, 0.1])
    assert p.q == pytest.approx(0.02) and p.tau2 == 0 and p.i2 == 0
    assert p.value == pytest.approx(-0.1) and p.se == pytest.approx(1 / math.sqrt(200))


def test_cells_that_disagree_widen_the_ci_beyond_the_fixed_effect_one():
    """-0.1 and +0.1, each se 0.01: fixed effects would say 0 -+ 0.014; Q = 200, c = 10000,
    tau^2 = 199/10000 = 0.0199, w = 1/0.02 = 50 each, se = 0.1, so 0 -+ 0.196; I^2 = 199/200."""
    p = dersimonian_laird([-0.1, 0.1], [0.01, 0.01])
    assert p.tau2 == pytest.approx(0.0199) and p.se == pytest.approx(0.1)
    assert (p.lo, p.hi) == pytest.approx((-0.196, 0.196)) and p.i2 == pytest.approx(0.995)


def test_one_cell_pools_to_itself_and_an_se_of_zero_is_refused():
    p = dersimonian_laird([0.05], [0.01])
    assert (p.value, p.se, p.tau2, p.i2, p.k) == (0.05, 0.01, 0.0, None, 1)
    with pytest.raises(ValueError):
        dersimonian_laird([0.05, 0.1], [0.01, 0.0])
    with pytest.raises(ValueError):
        dersimonian_laird([], [])


# ---------------------------------------------------------------- end to end


def compared(tmp_path, name, *groups, args=()):
    """A cell: results written, then `workbench compare --out`; returns the compare.json path."""
    path = write(tmp_path, results(*groups), f"{name}-results.json")
    out = tmp_path / f"{name}-compare.json"
    assert main(["compare", str(path), *args, "--out", str(out)]) == 0
    return out


@pytest.fixture
def two_cells(tmp_path, capsys):
    """Cell a: kl forgets 0.1 less than the baseline at every level, ewc 0.05 more, and 'tiny'
    learns too little to compare (a span of 0.05, under 10% of the reference's 1). Cell b: kl
    forgets 0.05 less; ewc and tiny are absent. Every point's se is 0.001, so each difference's
    se is sqrt(2) 0.001 = 0.0014142."""
    tiny = sweep("tiny", learning=lambda s: 2.0 - 0.05 * s, kl=lambda s: 0.01 * s)
    a = compared(tmp_path, "a", sweep("baseline"), sweep("kl", shift=-0.1), sweep("ewc", shift=0.05), tiny)
    b = compared(tmp_path, "b", sweep("baseline"), sweep("kl", shift=-0.05))
    capsys.readouterr()
    return a, b


def test_two_cells_end_to_end(tmp_path, capsys, two_cells):
    """kl: d = -0.1 and -0.05, se 0.0014142 each (v = 500,000): m = -0.075, Q = 2 * 500,000 *
    0.025^2 = 625, c = 1e6 - 5e5 = 5e5, tau^2 = 624 / 5e5 = 0.001248, w = 1/0.00125 = 800 each,
    se = 1/sqrt(1600) = 0.025: -0.075 [-0.124, -0.026], helps; I^2 = 624/625. ewc: one cell,
    +0.05 -+ 1.96 * 0.0014142, worse. tiny: no comparison in a, absent in b: nothing to pool."""
    a, b = two_cells
    out, md = tmp_path / "summary.json", tmp_path / "summary.md"
    assert main(["summarize", f"smollm2/unscramble={a}", f"gemma3/gsm8k={b}", "--out", str(out),
                 "--markdown", str(md)]) == 0
    table = capsys.readouterr().out
    assert table.startswith(KL) and "pooled (random effects)" in table and "smollm2/unscramble" in table
    assert "-0.075 [-0.124, -0.026]" in table and "2 of 2 cells; τ² 0.0012, I² 100%" in table
    assert "learns too little to compare" in table and "not in this cell" in table

    summary = json.loads(out.read_text())
    assert summary["kind"] == "workbench.summary" and [c["name"] for c in summary["cells"]] == [
        "smollm2/unscramble", "gemma3/gsm8k"]
    (t,) = summary["tables"]
    assert t["metric"] == KL and t["higher_is_better"] is False
    rows = {f["family"]: f for f in t["families"]}
    assert list(rows) == ["kl", "ewc", "tiny"]
    kl = rows["kl"]
    assert [c["difference"]["value"] for c in kl["cells"]] == pytest.approx([-0.1, -0.05])
    assert [c["difference"]["se"] for c in kl["cells"]] == pytest.approx([math.sqrt(2) * 1e-3] * 2)
    assert [c["level"] for c in kl["cells"]] == ["L5", "L5"]
    pool = kl["pooled"]
    assert pool["value"] == pytest.approx(-0.075) and pool["tau2"] == pytest.approx(0.001248)
    assert pool["se"] == pytest.approx(0.025) and pool["ci"] == pytest.approx([-0.124, -0.026])
    assert pool["i2"] == pytest.approx(624 / 625) and pool["k"] == 2 and pool["verdict"] == "helps"

    ewc = rows["ewc"]
    assert [c["status"] for c in ewc["cells"]] == ["compared", "absent"]
    assert ewc["pooled"]["k"] == 1 and ewc["pooled"]["cells"] == ["smollm2/unscramble"]
    assert ewc["pooled"]["ci"] == pytest.approx([0.05 - Z * math.sqrt(2e-6), 0.05 + Z * math.sqrt(2e-6)])
    assert ewc["pooled"]["i2"] is None and ewc["pooled"]["verdict"] == "worse"

    tiny = rows["tiny"]
    assert [c["status"] for c in tiny["cells"]] == ["no comparison", "absent"]
    assert not any(c["pooled"] for c in tiny["cells"]) and tiny["pooled"] is None
    assert "learns too little" in tiny["cells"][0]["summary"]
    text = md.read_text()
    assert "| kl | **helps at L5**" in text and "**helps**<br>-0.075 [-0.124, -0.026]" in text


def test_the_pool_uses_the_bootstrap_se_each_cell_records(tmp_path, capsys):
    """Two synthetic studies (per-item scores, so compare's paired bootstrap): each cell enters
    with its compare.json's difference.se (the replicates' sd), and the pool is DL of those."""
    a = compared(tmp_path, "a", synthetic_study(seed=0), args=["--forgetting", KL])
    b = compared(tmp_path, "b", synthetic_study(seed=1), args=["--forgetting", KL])
    out = tmp_path / "summary.json"
    assert main(["summarize", f"a={a}", f"b={b}", "--out", str(out)]) == 0
    for fam in json.loads(out.read_text())["tables"][0]["families"]:
        cells = [c for c in fam["cells"] if c["pooled"]]
        by_hand = dersimonian_laird([c["difference"]["value"] for c in cells], [c["difference"]["se"] for c in cells])
        assert fam["pooled"]["value"] == pytest.approx(by_hand.value)
        assert fam["pooled"]["ci"] == pytest.approx([by_hand.lo, by_hand.hi])
    reports = [json.loads(p.read_text()) for p in (a, b)]
    assert {m["method"] for r in reports for f in r["families"] for m in f["metrics"]} == {"paired bootstrap"}


# ---------------------------------------------------------------- bad input: one line, exit 2


def _with_metric(tmp_path, path, metric):
    """A copy of a compare.json whose only forgetting metric is renamed."""
    data = json.loads(path.read_text())
    data["forgetting"] = [{"metric": metric, "higher_is_better": True}]
    for fam in data["families"]:
        for m in fam["metrics"]:
            m["metric"] = metric
    out = tmp_path / "renamed.json"
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("case, expected", [
    ("missing", "compare.json not found"),
    ("results file", "not a compare.json (kind 'workbench.eval'"),
    ("broken", "not a workbench.compare file of schema 1 (learning"),
    ("no shared metric", "no forgetting metric is in every cell"),
    ("unknown metric", "--metric: 'retention.general.kll' is not compared in cell 'a' (did you mean"),
    ("no equals sign", "give a cell as NAME=compare.json"),
    ("empty name", "give a cell as NAME=compare.json"),
    ("a name twice", "cell 'a' is named twice"),
    ("a file twice", "read the same file"),
    ("out is a directory", "--out is a directory"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, two_cells, case, expected):
    a, b = two_cells
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"kind": "workbench.compare", "schema_version": 1, "families": []}))
    argv = {
        "missing": [f"a={a}", f"b={tmp_path / 'nope.json'}"],
        "results file": [f"a={a}", f"b={tmp_path / 'b-results.json'}"],
        "broken": [f"a={a}", f"b={broken}"],
        "no shared metric": [f"a={a}", f"b={_with_metric(tmp_path, b, 'retention.mc.all.acc.delta')}"],
        "unknown metric": [f"a={a}", f"b={b}", "--metric", "retention.general.kll"],
        "no equals sign": [f"a={a}", str(b)],
        "empty name": [f"a={a}", f"={b}"],
        "a name twice": [f"a={a}", f"a={b}"],
        "a file twice": [f"a={a}", f"b={a}"],
        "out is a directory": [f"a={a}", f"b={b}", "--out", str(tmp_path)],
    }[case]
    assert main(["summarize", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


def test_the_pooled_verdict_follows_the_metrics_direction():
    """An accuracy delta (higher is better) helps when the pooled CI lies above 0; a KL (lower is
    better) when it lies below; a CI across 0 is no different, and no pool is no comparison."""
    above, below, across = (dersimonian_laird([d], [0.01]) for d in (0.05, -0.05, 0.0))
    assert [pooled_verdict(p, higher=True) for p in (above, below, across)] == ["helps", "worse", "no different"]
    assert [pooled_verdict(p, higher=False) for p in (above, below, across)] == ["worse", "helps", "no different"]
    assert pooled_verdict(None, higher=False) == "no comparison"
