"""`workbench sweep`: grid and random search over recipe overrides, the leaderboard, the W&B
sweep YAML, and one-line errors for bad specs."""

import json
import re
from pathlib import Path

import pytest
import yaml

from workbench.cli import main
from workbench.errors import UsageError
from workbench.sweep.leaderboard import format_leaderboard, leaderboard
from workbench.sweep.spec import Trial, load_spec, trials
from workbench.sweep.wandb_sweep import wandb_sweep_config
from tests.helpers import REPO, repo

TINY = REPO / "recipes" / "tiny.yaml"
FAST = ["train.max_steps=3", "train.batch_size=4", "data.max_examples=24", "train.eval_steps=null",
        "data.max_val_examples=8"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.chdir(REPO)


def write_spec(tmp_path, **fields) -> Path:
    spec = {"recipe": str(TINY), "overrides": FAST,
            "parameters": {"regularizers.kl_to_base.weight": [0.0, 0.5]}, **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---------------------------------------------------------------- end to end


def test_two_by_two_grid_trains_four_runs_in_one_group_and_ranks_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = write_spec(tmp_path, name="kl_x_ewc",
                      overrides=[*FAST, "regularizers.ewc.reference=builtin:pydoc", "regularizers.ewc.num_examples=8"],
                      parameters={"regularizers.kl_to_base.weight": [0.0, 0.5], "regularizers.ewc.weight": [0.0, 1.0]},
                      objective={"metric": "eval_loss", "goal": "minimize"})
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--output-dir", str(out), "--wandb"]) == 0
    printed = capsys.readouterr().out

    runs = sorted(out.glob("run-*/run.json"))
    assert len(runs) == 4
    knobs = set()
    for path in runs:
        run = json.loads(path.read_text())
        assert run["status"] == "completed" and run["global_step"] == 3
        regs = run["recipe"]["regularizers"]
        knobs.add((regs["kl_to_base"]["weight"] if regs["kl_to_base"] else 0.0, regs["ewc"]["weight"]))
        assert run["wandb"]["group"] == "kl_x_ewc" and "sweep:kl_x_ewc" in run["recipe"]["wandb"]["tags"]
        assert (path.parent / "adapter" / "adapter_model.safetensors").is_file()
    assert knobs == {(0.0, 0.0), (0.0, 1.0), (0.5, 0.0), (0.5, 1.0)}
    assert len({json.loads(p.read_text())["wandb"]["name"] for p in runs}) == 4  # a name per knob setting

    board = json.loads((out / "leaderboard.json").read_text())
    assert board["wandb_group"] == "kl_x_ewc" and board["objective"]["metric"] == "eval_loss"
    rows = board["runs"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    losses = [r["objective"] for r in rows]
    assert losses == sorted(losses)
    for row in rows:
        final = json.loads((Path(row["run_dir"]) / "run.json").read_text())["final"]
        assert row["objective"] == pytest.approx(final["eval_loss"])
    table = printed[printed.index("rank"):].splitlines()
    assert "kl_to_base.weight" in table[0] and "ewc.weight" in table[0] and "eval_loss (min)" in table[0]
    assert [line.split()[1] for line in table[2:6]] == [r["run"] for r in rows]
    assert f"leaderboard: {out / 'leaderboard.json'}" in printed

    sweep_yaml = yaml.safe_load((out / "wandb_sweep.yaml").read_text())
    assert sweep_yaml["method"] == "grid" and sweep_yaml["metric"] == {"name": "eval/loss", "goal": "minimize"}
    assert sweep_yaml["parameters"]["regularizers.ewc.weight"] == {"values": [0.0, 1.0]}
    assert sweep_yaml["command"][-2:] == ["--wandb", "${args_no_hyphens}"]


def test_parallel_processes_run_every_run_with_its_own_log(tmp_path, capsys):
    spec = write_spec(tmp_path, name="par")
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--output-dir", str(out), "--parallel", "2"]) == 0
    for i in range(2):
        run = json.loads((out / f"run-{i:02d}" / "run.json").read_text())
        assert run["status"] == "completed" and "wandb" not in run  # tracking was not asked for
        assert "optimizer: AdamW" in (out / f"run-{i:02d}" / "train.log").read_text()
    assert [r["status"] for r in json.loads((out / "leaderboard.json").read_text())["runs"]] == ["completed"] * 2


def test_a_failing_run_is_listed_last_and_the_others_still_run(tmp_path, capsys):
    spec = write_spec(tmp_path, parameters={"data.train": ["builtin:tiny_reverse", str(tmp_path / "missing.jsonl")]})
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--output-dir", str(out)]) == 0
    rows = json.loads((out / "leaderboard.json").read_text())["runs"]
    assert [(r["run"], r["status"], r["rank"]) for r in rows] == [("run-00", "completed", 1), ("run-01", "failed", None)]
    assert "missing.jsonl" in rows[1]["error"] and "not found" in rows[1]["error"]


def test_dry_run_validates_lists_and_writes_the_wandb_yaml_only(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", repo("recipes/sweeps/tiny_kl_x_ewc.yml"), "--output-dir", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"workbench train \S*recipes/tiny\.yaml", printed)) == 9
    assert sorted(p.name for p in out.iterdir()) == ["wandb_sweep.yaml"]
    config = yaml.safe_load((out / "wandb_sweep.yaml").read_text())
    assert config["metric"] == {"name": "learning/val_loss/tuned", "goal": "minimize"}
    assert main(["sweep", repo("recipes/sweeps/tiny_random_lr.yml"), "--output-dir", str(out), "--dry-run"]) == 0


# ---------------------------------------------------------------- search and ranking


def test_random_search_is_seeded_and_stays_in_range(tmp_path):
    spec = load_spec(write_spec(tmp_path, method="random", num_runs=20, seed=3, parameters={
        "train.learning_rate": {"distribution": "log_uniform", "min": 1e-4, "max": 1e-2},
        "lora.r": [4, 8], "train.seed": {"distribution": "int_uniform", "min": 0, "max": 5}}))
    drawn = trials(spec, tmp_path)
    assert len(drawn) == 20 and [t.knobs for t in drawn] == [t.knobs for t in trials(spec, tmp_path)]
    assert all(1e-4 <= t.knobs["train.learning_rate"] <= 1e-2 for t in drawn)
    assert {t.knobs["lora.r"] for t in drawn} == {4, 8} and all(isinstance(t.knobs["train.seed"], int) for t in drawn)
    params = wandb_sweep_config(spec, tmp_path / "spec.yaml")["parameters"]
    assert params["train.learning_rate"] == {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}
    assert params["lora.r"] == {"values": [4, 8]}


def fake_run(directory: Path, eval_loss: float | None, ppl_ratio: float | None) -> None:
    directory.mkdir(parents=True)
    final = {} if eval_loss is None else {"eval_loss": eval_loss}
    (directory / "run.json").write_text(json.dumps({"recipe": {"name": directory.name}, "status": "completed",
                                                    "final": final}))
    metrics = {"retention.general.ppl.ratio": {"value": ppl_ratio}, "learning.val_loss.tuned": {"value": 1.0}}
    entries = [{"name": "x", "scale": 0.5, "metrics": {"retention.general.ppl.ratio": {"value": 0.0}}},
               {"name": "x", "scale": 1.0, "metrics": metrics}]
    (directory / "results.json").write_text(json.dumps({"kind": "workbench.eval", "schema_version": 2,
                                                        "entries": entries}))


def test_leaderboard_ranks_feasible_runs_first_by_the_objective(tmp_path):
    spec = load_spec(write_spec(tmp_path, objective={"metric": "eval_loss"}, eval_suite="suite.yaml",
                                constraints=[{"metric": "retention.general.ppl.ratio", "max": 1.05}]))
    cases = {"a": (2.0, 1.01), "b": (1.0, 1.20), "c": (1.5, 1.04), "d": (None, 1.0), "e": (0.5, None)}
    runs = []
    for i, (name, (loss, ratio)) in enumerate(cases.items()):
        fake_run(tmp_path / name, loss, ratio)
        runs.append(Trial(i, {"regularizers.kl_to_base.weight": i}, tmp_path / name, status="completed"))
    runs.append(Trial(9, {"regularizers.kl_to_base.weight": 9}, tmp_path / "f", status="failed", error="boom"))
    rows = leaderboard(spec, runs)
    assert [(r["run"], r["rank"]) for r in rows] == [("c", 1), ("a", 2), ("e", None), ("b", None), ("d", None),
                                                      ("f", None)]
    assert rows[3]["violated"] == ["retention.general.ppl.ratio <= 1.05"]
    assert rows[2]["violated"] and rows[2]["constraints"]["retention.general.ppl.ratio"] is None  # missing: not ranked
    text = format_leaderboard(spec, rows)
    assert "violates retention.general.ppl.ratio <= 1.05" in text and "failed: boom" in text and "no eval_loss" in text

    maximize = spec.model_copy(update={"objective": spec.objective.model_copy(update={"goal": "maximize"})})
    assert [r["run"] for r in leaderboard(maximize, runs)][:2] == ["a", "c"]


# ---------------------------------------------------------------- bad specs: exit 2, one line


@pytest.mark.parametrize("fields, expected", [
    ({"paramters": {"x": [1]}}, ["unknown key 'paramters'", "did you mean 'parameters'"]),
    ({"parameters": {}}, ["parameters"]),
    ({"parameters": {"train.learning_rate": {"distribution": "log_uniform", "min": 0.1, "max": 0.01}}},
     ["min < max"]),
    ({"parameters": {"train.learning_rate": {"distribution": "uniform", "min": 0.0, "max": 1.0}}},
     ["parameters.train.learning_rate", "grid search needs a list of values"]),
    ({"method": "random"}, ["num_runs"]),
    ({"method": "bayes"}, ["method"]),
    ({"objective": {"metric": "retention.general.ppl.ratio"}}, ["retention.general.ppl.ratio", "eval_suite"]),
    ({"parameters": {"regularizers.kl_to_bse.weight": [1]}}, ["regularizers.kl_to_bse", "did you mean 'kl_to_base'"]),
    ({"parameters": {"train.batch_size": [4, "many"]}}, ["train.batch_size", "many"]),
    ({"objective": {"metric": "retention.general.ppl.ratoi"}, "eval_suite": "suite.yaml"},
     ["not a results.json metric", "did you mean 'retention.general.ppl.ratio'"]),
])
def test_bad_spec_is_one_error_line_naming_the_file_and_key(tmp_path, capsys, fields, expected):
    spec = write_spec(tmp_path, **fields)
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--output-dir", str(out)]) == 2
    line = one_error_line(capsys)
    assert str(spec) in line, line
    for part in expected:
        assert part in line, line
    assert not out.exists()  # nothing runs, nothing is written


LIGHT_CHECK = """
import sys, tempfile
import workbench.config.recipe, workbench.errors, workbench.formats.metrics, workbench.formats.run_record, workbench.io
before = set(sys.modules)
from workbench.sweep.runner import run_sweep
with tempfile.TemporaryDirectory() as out:
    run_sweep("recipes/sweeps/tiny_kl_x_ewc.yml", output_dir=out, dry_run=True)  # cwd: the repository
heavy = ("torch", "transformers", "wandb", "peft", "accelerate", "workbench.training", "workbench.evals",
         "workbench.modeling", "workbench.tracking.training", "workbench.tracking.evals")
print(sorted(m for m in set(sys.modules) - before if m.startswith(heavy)))
"""


def test_validating_a_spec_imports_nothing_beyond_config_and_formats():
    """`--dry-run` and load_spec add no torch, transformers, wandb, training or eval module to
    what the config and formats layers import themselves (which, below the top layer, is no torch)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", LIGHT_CHECK], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "[]"


def test_missing_spec_and_bad_parallel_are_usage_errors(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "sweep spec file not found" in one_error_line(capsys)
    with pytest.raises(UsageError, match="--parallel 0"):
        from workbench.sweep.runner import run_sweep
        run_sweep(write_spec(tmp_path), parallel=0)


def test_seeds_as_a_parameter_make_one_family_with_a_seed_each(tmp_path):
    """A sweep that repeats a recipe over `train.seed` gives evaluated entries of one family, each
    with its run's seed: what `workbench compare` pools (mean over seeds, their spread in the CI)."""
    from workbench.compare.points import families, read_entries

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "seeds", "batch_size": 16, "max_length": 64, "bootstrap": 20,
                                     "general": {"num_chunks": 4, "chunk_length": 32, "top_k": 16},
                                     "target": {"num_examples": 4, "max_new_tokens": 4}, "overfitting": None,
                                     "scales": [0.5]}))
    out = tmp_path / "sweep"
    spec = write_spec(tmp_path, name="seeds", parameters={"train.seed": [0, 1]}, eval_suite=str(suite))
    assert main(["sweep", str(spec), "--output-dir", str(out)]) == 0
    results = sorted(out.glob("run-*/results.json"))
    grouped = families(read_entries(results))
    assert list(grouped) == ["tiny"] and sorted(grouped["tiny"]) == [0, 1]
    assert all(len(entries) == 2 for entries in grouped["tiny"].values())  # scale 1 and 0.5 per seed
