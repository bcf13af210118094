"""scripts/bench.py runs end to end (its smallest profile: a tiny random model, seconds) and writes
the JSON list it promises. The figures themselves are not checked: one round on a tiny model
measures nothing."""

import json
import math
import subprocess
import sys

import pytest
from tests.helpers import REPO as ROOT

NAMES = ["no_regularizer", "kl_to_base", "ewc_kfac_diag", "ewc_diag", "delta_l2", "label_smoothing",
         "bf16_mixed", "kl_topk_cache", "kl_memory_vs_naive", "kl_memory_growth", "mc_eval", "mc_eval_scoring_only",
         "ppl_eval", "ppl_eval_scoring_only"]


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    pytest.importorskip("lm_eval")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_every_figure_is_written_with_a_ratio_and_a_target(figures):
    rows, _ = figures
    assert [r["name"] for r in rows] == NAMES
    for r in rows:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r["name"]
        assert r["target"] is None or r["target"].split()[0] in ("<=", ">="), r["name"]
        assert r["met"] is None if r["target"] is None else isinstance(r["met"], bool), r["name"]
        op, bound = (r["target"] or "<= inf").split()
        if r["met"] is not None:
            assert r["met"] == (r["ratio"] <= float(bound) if op == "<=" else r["ratio"] >= float(bound))


def test_training_rows_carry_times_and_peak_memory(figures):
    rows = {r["name"]: r for r in figures[0]}
    for name in NAMES[:8]:
        assert rows[name]["unit"] == "s/step" and rows[name]["a"] > 0 and rows[name]["b"] > 0
        assert rows[name]["peak_mb_a"] >= 0 and rows[name]["peak_mb_b"] >= 0
    assert rows["kl_topk_cache"]["kl_cache_lower"] <= rows["kl_topk_cache"]["kl_exact"] + 1e-6
    assert rows["kl_topk_cache"]["kl_exact"] <= rows["kl_topk_cache"]["kl_cache_upper"] + 1e-6


def test_eval_scores_are_identical_to_lm_eval(figures):
    rows = {r["name"]: r for r in figures[0]}
    for name in ("mc_eval", "ppl_eval"):
        assert rows[name]["identical_scores"] is True
    assert rows["mc_eval"]["acc"]["ours"] == rows["mc_eval"]["acc"]["lm_eval"]


def test_a_table_is_printed(figures):
    _, stdout = figures
    assert "| figure | compared |" in stdout
    assert stdout.count("\n| ") >= len(NAMES) + 1
