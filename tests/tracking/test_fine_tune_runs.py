"""The W&B runs of two fine-tunes (tests/tracking/conftest.py: a baseline and a KL run of
recipes/tiny.yaml, trained, evaluated together and gated, offline), decoded from their `.wandb`
files: a train, an eval and a gate run each, one folder per run id, all listed in run.json; the
same config keys on every recipe (weights 0 when off), family, seed and tags; each eval run with
its own plots only; a monotone step in every run; the gate's decision as summary keys and a table."""

import json
import shutil
from pathlib import Path

import pytest

from tests.wandb_log import read_folder
from workbench.cli import main
from workbench.config.penalties import PENALTY_CONFIGS
from workbench.tracking.gates import CHECK_COLUMNS, gate_summary
from workbench.tracking.names import run_config, run_tags, with_every_penalty
from workbench.tracking.wandb_run import Tracker

JOBS = ["train", "eval", "gate"]


@pytest.fixture(scope="module")
def decoded(study):
    """{fine-tune: {job type: what its folder holds}}, from the folders run.json lists."""
    return {name: {r["job_type"]: read_folder(r["dir"]) for r in run["wandb"]["runs"]}
            for name, run in study["runs"].items()}


def test_every_fine_tune_is_a_train_an_eval_and_a_gate_run_one_folder_each(study, decoded):
    listed = [r for run in study["runs"].values() for r in run["wandb"]["runs"]]
    assert [[r["job_type"] for r in run["wandb"]["runs"]] for run in study["runs"].values()] == [JOBS, JOBS]
    assert len({r["id"] for r in listed}) == 6  # no id is written twice, so no sync merges folders
    on_disk = sorted((study["root"] / "wandb" / "wandb").glob("offline-run-*"))
    assert sorted(Path(r["dir"]) for r in listed) == on_disk  # run.json names every folder written
    for name, run in study["runs"].items():
        assert run["wandb"]["id"] == run["wandb"]["runs"][0]["id"]  # the training run on top, as --resume reads it
        for r in run["wandb"]["runs"]:
            got = decoded[name][r["job_type"]]
            assert (got["id"], got["job_type"], got["group"]) == (r["id"], r["job_type"], "tiny")
            assert Path(r["dir"]).name.endswith(f"-{r['id']}") and r["mode"] == "offline"
        assert decoded[name]["eval"]["config"]["run.train_id"] == run["wandb"]["id"]
        assert decoded[name]["gate"]["config"]["run.train_id"] == run["wandb"]["id"]


def test_config_keys_are_the_same_on_every_recipe_with_weights_0_when_off(decoded):
    for job in JOBS:
        assert set(decoded["baseline"][job]["config"]) == set(decoded["kl"][job]["config"]), job
    base, kl = decoded["baseline"]["train"]["config"], decoded["kl"]["train"]["config"]
    for penalty in PENALTY_CONFIGS:
        assert base[f"regularizers.{penalty}.weight"] == 0, penalty
    assert base["regularizers.neftune_alpha"] == 0 and base["regularizers.kl_to_base.direction"] == "forward"
    assert (kl["regularizers.kl_to_base.weight"], kl["regularizers.delta_l2.weight"], kl["regularizers.ewc.weight"]) \
        == (0.5, 0.1, 0)
    assert not {f"regularizers.{p}" for p in PENALTY_CONFIGS} & set(base)  # no section left as one null key
    for job in ("eval", "gate"):  # the eval and gate runs carry the recipe too: one runs table per job type
        assert set(decoded["kl"]["train"]["config"]) <= set(decoded["kl"][job]["config"])


def test_family_seed_and_tags_are_set(decoded):
    for name, penalties in (("baseline", ["baseline"]), ("kl", ["kl_to_base", "delta_l2"])):
        for job in JOBS:
            got = decoded[name][job]
            assert got["config"]["family"] == "tiny" and got["config"]["seed"] == 0
            assert got["tags"] == ["family:tiny", "model:tiny-random-llama", "seed:0", *penalties], (name, job)


def test_each_eval_run_logs_its_own_plots_only(study, decoded):
    names = {run: {e["name"] for e in study["results"]["entries"] if e["run"] == str(d)}
             for run, d in study["dirs"].items()}
    for run, other in (("baseline", "kl"), ("kl", "baseline")):
        images = {k for row in decoded[run]["eval"]["history"] for k, v in row.items()
                  if isinstance(v, dict) and v.get("_type") == "image-file"}
        assert f"plots/loss-{run}" in images and f"plots/loss-{other}" not in images, images
        assert {f"plots/roc-{n}" for n in names[run]} <= images
        assert not {f"plots/roc-{n}" for n in names[other]} & images


def test_every_run_logs_a_monotone_step(decoded):
    for name, jobs in decoded.items():
        for job, got in jobs.items():
            steps = [row["_step"] for row in got["history"]]
            assert steps == list(range(len(steps))) and steps, (name, job, steps)
        trained = [row["train/global_step"] for row in jobs["train"]["history"] if "train/task_loss" in row]
        assert trained == [1, 2, 3]


def test_the_gate_decision_is_in_each_gate_run_as_summary_keys_and_a_table(study, decoded):
    assert study["gate_code"] == 0 and study["gate"]["passed"]
    for run, directory in study["dirs"].items():
        entries = {e["name"] for e in study["results"]["entries"] if e["run"] == str(directory)}
        mine = [c for c in study["gate"]["checks"] if c["entry"] in entries]
        got = decoded[run]["gate"]
        summary = {k: v for k, v in got["summary"].items() if k.startswith("gate/lenient/") and k != "gate/lenient/checks"}
        assert summary == {"gate/lenient/passed": True, "gate/lenient/verdict": f"gate lenient: PASS ({len(mine)} checks passed)",
                           "gate/lenient/counts/pass": len(mine), "gate/lenient/counts/fail": 0,
                           "gate/lenient/counts/missing": 0, "gate/lenient/counts/skipped": 0,
                           "gate/lenient/counts/total": len(mine)}
        ref = got["summary"]["gate/lenient/checks"]
        table = json.loads((got["files"] / ref["path"]).read_text())
        assert table["columns"] == CHECK_COLUMNS
        assert table["data"] == [[c[k] for k in CHECK_COLUMNS] for c in mine]


def test_gate_json_on_standard_output_stays_json_while_it_logs(study, tmp_path, capsys, monkeypatch):
    """`gate --json -` with W&B on: the wandb lines go to standard error. On copies of the runs,
    so the study's run.json files keep their three runs."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    results = dict(study["results"])
    results["entries"] = []
    for entry in study["results"]["entries"]:
        copy = tmp_path / Path(entry["run"]).name
        if not copy.exists():
            shutil.copytree(entry["run"], copy)
        results["entries"].append({**entry, "run": str(copy)})
    (tmp_path / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    code = main(["gate", str(tmp_path / "results.json"), "--policy", str(study["root"] / "lenient.yaml"),
                 "--json", "-"])
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["passed"] is True
    assert "wandb: offline run" in captured.err
    copied = json.loads((tmp_path / "kl" / "run.json").read_text())["wandb"]["runs"]
    assert [r["job_type"] for r in copied] == [*JOBS, "gate"]


def test_gate_logs_nothing_for_untracked_runs_or_with_no_wandb(study, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    results = {**study["results"], "entries": [{**e, "run": None} for e in study["results"]["entries"]]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    monkeypatch.setattr(Tracker, "start", classmethod(lambda *a, **k: pytest.fail("started")))
    policy = str(study["root"] / "lenient.yaml")
    assert main(["gate", str(tmp_path / "results.json"), "--policy", policy]) == 0
    assert main(["gate", str(study["root"] / "results.json"), "--policy", policy, "--no-wandb"]) == 0


def test_config_and_tags_of_a_recipe_without_tracking_or_penalties():
    recipe = {"name": "r", "family": None, "train": {"seed": 3}, "model": {"name": "/cache/models/some-base"},
              "regularizers": {"neftune_alpha": None, "kl_to_base": None, "ewc": None, "delta_l2": {"weight": 0.0}},
              "wandb": None}
    filled = with_every_penalty(recipe)["regularizers"]
    assert filled["ewc"]["weight"] == 0 and filled["kl_to_base"]["weight"] == 0 and filled["neftune_alpha"] == 0
    assert recipe["regularizers"]["ewc"] is None  # the recipe itself is left as it was
    config = run_config(recipe)
    assert config["family"] == "r" and config["seed"] == 3 and "wandb" not in config
    assert run_tags(recipe) == ["family:r", "model:some-base", "seed:3", "baseline"]
    assert run_tags({**recipe, "wandb": {"tags": ["mine", "family:r"]}})[:2] == ["mine", "family:r"]
    replaying = {**recipe, "regularizers": {**recipe["regularizers"], "base_replay": {"ratio": 0.25}}}
    assert run_tags(replaying)[-1] == "base_replay"  # a data-side regularizer is no baseline
    distilling = {**recipe, "data": {"train": "t.jsonl", "self_distill": {"temperature": 0.0}}}
    assert run_tags(distilling)[-1] == "self_distill"
    assert run_tags({**recipe, "train": {**recipe["train"], "example_weights": "flow"}})[-1] == "flow"
    assert run_tags({**recipe, "lora": {"method": "osf"}})[-1] == "osf"


def test_gate_summary_counts_and_passes():
    outcome = {"policy": {"name": "p"}, "passed": False, "verdict": "gate p: FAIL (...)",
               "counts": {"pass": 1, "fail": 1, "missing": 1, "skipped": 0}, "checks": [{}, {}, {}]}
    assert gate_summary(outcome) == {"gate/p/passed": False, "gate/p/verdict": "gate p: FAIL (...)",
                                     "gate/p/counts/pass": 1, "gate/p/counts/fail": 1, "gate/p/counts/missing": 1,
                                     "gate/p/counts/skipped": 0, "gate/p/counts/total": 3}
