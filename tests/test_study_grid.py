"""The study's grid (scripts/grid_cells.py) is consistent, and scripts/grid.py plans it without
running anything: every row's recipe loads with its cell's trim and its overrides, every cell has
its reference (five seeds at full strength) and the findings it tests, and resume keeps what is done."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
from grid import done, runnable  # noqa: E402
from grid_cells import CELLS, LANDING, RECIPES, STEP_S, Row, estimate, missing_key  # noqa: E402

from workbench.config.recipe import load_recipe  # noqa: E402
from workbench.errors import UsageError  # noqa: E402
from workbench.evals.suite import load_suite  # noqa: E402

TASK_DATA = {"unscramble": "bigbench:word_unscrambling:train", "gsm8k": "builtin:gsm8k", "nq_open": "builtin:nq_open"}


def loaded(cell, row):
    return load_recipe(RECIPES / row.recipe, [*cell.train_args, *row.overrides])


def test_cells_are_the_two_models_by_the_three_tasks():
    assert [c.name for c in CELLS] == [f"{m}-{t}" for m in ("smollm2", "gemma3") for t in ("unscramble", "nq_open", "gsm8k")]


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_every_row_loads_on_the_cells_model_and_task(cell):
    for row in cell.rows:
        if missing_key(row):  # a method not in this version yet: only the keys about to land
            assert missing_key(row) in LANDING, row.name
            continue
        recipe = loaded(cell, row)
        assert recipe.model.name == cell.model and recipe.data.train == TASK_DATA[cell.task], row.name


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_every_cell_has_its_reference_and_the_findings_it_tests(cell):
    base = loaded(cell, cell.rows[0])
    seeds = [loaded(cell, r) for r in cell.rows if r.family == "baseline"]
    assert len({r.train.seed for r in seeds}) == len(seeds) >= 5
    # full strength: the seeds differ from the first only in the seed
    assert all(r.model_copy(update={"train": r.train.model_copy(update={"seed": 0})}) == base for r in seeds)
    families = {r.family: loaded(cell, r) for r in cell.rows if r.family != "baseline" and not missing_key(r)}
    assert families["lr_low"].train.learning_rate < base.train.learning_rate and families["lr_low"].lora.enabled
    assert not families["full_ft"].lora.enabled
    assert {"kl_to_base", "ewc", "delta_l2", "lora_dropout", "label_smoothing", "replay", "base_replay",
            "self_distill", "flow", "osf"} <= {r.family for r in cell.rows}
    assert all(r.name == r.family for r in cell.rows if r.family != "baseline")  # one family a row
    assert cell.rows[0].name == "baseline" and all(r.recipe == cell.baseline for r in cell.rows)
    suite, _ = load_suite(REPO / cell.suite)
    assert ("retention.mc.all.acc.delta" in cell.forgetting) == bool(suite.multiple_choice)


def test_a_row_with_a_key_no_version_has_is_refused_not_left_out():
    cell = CELLS[0]
    typo = Row("kl", cell.baseline, ("regularizers.kl_to_bse.weight=1",), "kl")
    assert missing_key(typo) == "regularizers.kl_to_bse.weight"
    with pytest.raises(UsageError, match="kl_to_bse"):
        runnable(cell.__class__(**{**cell.__dict__, "rows": [typo]}), set(), heavy=False)


def test_the_estimate_of_one_baseline_run_by_hand():
    cell = CELLS[0]  # 20 steps of 16, validation once (64 examples, 4 batches at half a step), one checkpoint
    row = cell.rows[0]
    est = estimate(cell, [row], [row])
    step = STEP_S[(cell.model, cell.task)]
    assert est.train == pytest.approx(20.0 + 20 * step + 4 * 0.5 * step)
    assert est.eval == pytest.approx(70.0 + 4 * 10.0) and est.generation == 0
    assert estimate(cell, [row], []).train == 0  # a completed run is scored, not trained


def test_a_cell_is_done_when_its_comparison_holds_every_row(tmp_path):
    rows = CELLS[0].rows[:2]
    assert not done(tmp_path, rows)
    (tmp_path / "compare.json").write_text("{}")
    (tmp_path / "plan.json").write_text(json.dumps({"rows": [rows[0].name]}))
    assert not done(tmp_path, rows)  # a row added since: the cell runs again, its completed runs kept
    (tmp_path / "plan.json").write_text(json.dumps({"rows": [r.name for r in rows]}))
    assert done(tmp_path, rows)


def run_grid(tmp_path, **env):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OUT": str(tmp_path / "runs"), "KEEP": str(tmp_path / "keep"), **env}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "grid.py")], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_a_dry_run_prints_the_plan_and_its_estimate_and_writes_nothing(tmp_path):
    result = run_grid(tmp_path, DRY_RUN="1", CELLS="smollm2-gsm8k", ONLY="baseline lr_low self_distill")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "== smollm2-gsm8k: 2 runs (2 to train)" in out and "estimated" in out
    assert "self_distill left out: rewriting 160 worked solutions" in out
    assert "lr_low           to train         recipes/smollm2/gsm8k_baseline.yaml" in out
    assert out.strip().splitlines()[-1].startswith("== grid: estimated")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "keep").exists()
    heavy = run_grid(tmp_path, DRY_RUN="1", CELLS="smollm2-gsm8k", ONLY="self_distill", HEAVY="1")
    assert "1 runs (1 to train)" in heavy.stdout


def test_an_unknown_cell_is_one_error_line(tmp_path):
    result = run_grid(tmp_path, DRY_RUN="1", CELLS="smollm2-gsm8 gemma3-gsm8k")
    assert result.returncode == 2 and result.stderr.startswith("error: CELLS: no cell smollm2-gsm8;")
