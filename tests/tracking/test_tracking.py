"""W&B tracking: what an offline run logged, read back from its `.wandb` files; tracking that is
off or failing never stops training; no secret reaches a file or a log line."""

import json
import shutil
import re
import sys
from pathlib import Path

import pytest

from tests.tracking.conftest import FAST, PENALTIES, SECRET
from tests.wandb_log import items, read_folder, read_wandb_records
from workbench.cli import main
from workbench.errors import UsageError
from workbench.config.recipe import WandbSection, load_recipe, resolved
from workbench.formats.metrics import wandb_key
from workbench.formats.results import Entry
from workbench.tracking.evals import TABLE_COLUMNS, log_eval, metric_rows
from workbench.tracking.names import (
    enable, family, flatten, has_api_key, recipe_hash, resolve_mode, run_config, run_name, trainer_key
)
from workbench.tracking.wandb_run import Tracker
from tests.helpers import REPO, repo

# ---------------------------------------------------------------- reading a run back


def run_files(wandb_dir: Path, run_id: str) -> list[Path]:
    """Every `.wandb` file of a run, oldest first: offline, each rejoin writes a file of its own."""
    return sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def read_back(wandb_dir: Path, run_id: str) -> dict:
    """What the run logged, over every folder of its id: config, history rows, summary, artifacts
    and the files directories."""
    got = {"config": {}, "history": [], "summary": {}, "artifacts": [], "files": []}
    for path in run_files(wandb_dir, run_id):
        one = read_folder(path.parent)
        got["files"].append(one["files"])
        for key in ("config", "summary"):
            got[key].update(one[key])
        got["history"] += one["history"]
        got["artifacts"] += one["artifacts"]
    return got


def logged_table(got: dict, key: str) -> dict:
    """A W&B Table logged under `key`, read from the media file its history record points to."""
    ref = next(row[key] for row in got["history"] if key in row)
    assert ref["_type"] == "table-file"
    path = next(files / ref["path"] for files in got["files"] if (files / ref["path"]).is_file())
    return json.loads(path.read_text())


def job_run(run: dict, job_type: str) -> dict:
    """The one W&B run of `job_type` that run.json lists."""
    (found,) = [r for r in run["wandb"]["runs"] if r["job_type"] == job_type]
    return found


@pytest.fixture(scope="module")
def tracked(study):
    """The KL run of the shared study (tests/tracking/conftest.py)."""
    return {**study, "run": study["runs"]["kl"], "run_dir": study["dirs"]["kl"]}


def test_offline_run_holds_the_resolved_recipe_as_flat_config(tracked):
    run = tracked["run"]
    assert run["wandb"]["mode"] == "offline" and run["wandb"]["group"] == "tiny"
    assert run["wandb"]["name"] == f"tiny-{recipe_hash(run['recipe'])}"
    got = read_back(tracked["root"] / "wandb", run["wandb"]["id"])
    assert {k: got["config"][k] for k in run_config(run["recipe"], run)} == run_config(run["recipe"], run)
    for key, value in flatten(run["recipe"]).items():  # the recipe as run.json has it, off penalties filled in
        if value is not None and not key.startswith("wandb."):
            assert got["config"][key] == value, key
    assert got["config"]["regularizers.kl_to_base.weight"] == 0.5
    assert got["config"]["regularizers.ewc.weight"] == 0 and run["recipe"]["regularizers"]["ewc"] is None
    assert got["config"]["run.model_fingerprint"] == run["model_fingerprint"]


def test_every_loss_term_learning_rate_grad_norm_and_throughput_is_in_the_history(tracked):
    run = tracked["run"]
    got = read_back(tracked["root"] / "wandb", run["wandb"]["id"])
    steps = {row["train/global_step"]: row for row in got["history"] if "train/task_loss" in row}
    assert sorted(steps) == [1, 2, 3]
    terms = ["task_loss", "loss", "kl_to_base", "kl_to_base_weighted", "delta_l2", "delta_l2_weighted",
             "learning_rate", "grad_norm", "tokens_per_second"]
    for step, row in steps.items():
        for term in terms:
            assert f"train/{term}" in row, (step, term)
        assert row["train/tokens_per_second"] > 0
    # the same numbers run.json keeps, step by step
    for record in (h for h in run["history"] if "task_loss" in h):
        for term in ("kl_to_base", "delta_l2_weighted", "task_loss"):
            assert steps[record["step"]][f"train/{term}"] == pytest.approx(record[term])
    assert any("eval/loss" in row for row in got["history"])


def test_eval_results_land_in_an_eval_run_as_summary_tables_and_plots(tracked):
    run, results = tracked["run"], tracked["results"]
    assert len(run_files(tracked["root"] / "wandb", run["wandb"]["id"])) == 1  # eval never reopens it
    evaluated = job_run(run, "eval")
    assert evaluated["id"] != run["wandb"]["id"] and evaluated["name"] == f"{run['wandb']['name']}-eval"
    got = read_back(tracked["root"] / "wandb", evaluated["id"])
    metrics = next(e for e in results["entries"] if e["scale"] == 1.0 and e["run"] == str(tracked["run_dir"]))["metrics"]
    assert got["summary"]["retention/general/ppl/ratio"] == pytest.approx(metrics["retention.general.ppl.ratio"]["value"])
    assert got["summary"]["learning/val_loss/delta"] == pytest.approx(metrics["learning.val_loss.delta"]["value"])
    assert got["summary"]["overfit/loss_gap"] == pytest.approx(metrics["overfitting.loss_gap"]["value"])

    table = logged_table(got, "eval/retention")
    assert table["columns"] == TABLE_COLUMNS
    rows = {(r[2], r[3]): dict(zip(table["columns"], r)) for r in table["data"] if r[1] == 1.0}
    ppl = rows[("general", "ppl")]
    assert ppl["base"] == pytest.approx(metrics["retention.general.ppl.base"]["value"])
    assert ppl["tuned"] == pytest.approx(metrics["retention.general.ppl.tuned"]["value"])
    assert ppl["change"] == pytest.approx(metrics["retention.general.ppl.ratio"]["value"])
    assert [ppl["ci_low"], ppl["ci_high"]] == pytest.approx(metrics["retention.general.ppl.ratio"]["ci"])
    assert logged_table(got, "eval/learning")["data"] and logged_table(got, "eval/overfit")["data"]

    images = {k for row in got["history"] for k, v in row.items() if isinstance(v, dict) and v.get("_type") == "image-file"}
    assert images and all(k.startswith("plots/") for k in images)


def test_adapter_and_results_are_artifacts_with_their_lineage(tracked):
    run = tracked["run"]
    got = {"artifacts": [a for r in run["wandb"]["runs"] for a in read_folder(r["dir"])["artifacts"]]}
    by_type = {a["type"]: a for a in got["artifacts"]}
    assert by_type["model"]["name"] == f"{run['wandb']['name']}-adapter"
    for artifact in (by_type["model"], by_type["eval-results"]):
        assert artifact["metadata"]["model_fingerprint"] == run["model_fingerprint"]
        assert artifact["metadata"]["train_fingerprint"] == run["data"]["train_fingerprint"]
    assert by_type["eval-results"]["metadata"]["base_fingerprint"] == tracked["results"]["base"]["fingerprint"]


def test_offline_run_prints_the_sync_command(tracked):
    run = tracked["run"]
    assert f"wandb sync {run['wandb']['dir']}" in tracked["stdout"]
    assert Path(run["wandb"]["dir"]).is_dir()


def test_secrets_are_never_written_to_run_json_logs_or_reports(tracked):
    """The API key was in the environment for training, eval and report: no file under the run,
    the W&B directory or the report holds it, and nothing printed does."""
    assert SECRET not in tracked["stdout"] and SECRET not in tracked["stderr"]
    scanned = 0
    for path in tracked["root"].rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), path
            scanned += 1
    assert scanned > 10
    assert (tracked["root"] / "report" / "index.html").is_file()
    assert "api_key" not in json.dumps(tracked["run"]).lower()


def test_read_wandb_records_follows_records_across_32k_blocks(tmp_path, monkeypatch):
    """Long runs span many blocks of the log: every record comes back, in order."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(project="t", dir=str(tmp_path), reinit="create_new",
                     settings=wandb.Settings(console="off", silent=True))
    for step in range(1500):
        run.log({"value": step, "padding": "x" * (step % 200)})
    run.finish()
    path = next(tmp_path.rglob("*.wandb"))
    assert path.stat().st_size > 3 * 32768
    steps = [items(r.history.item)["value"] for r in read_wandb_records(path)
             if r.WhichOneof("record_type") == "history"]
    assert steps == list(range(1500))


def test_resume_rejoins_the_w_and_b_run_and_tracking_settings_may_change(tmp_path, monkeypatch):
    """`--resume` needs the same recipe, but the wandb section only says where results go."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    args = ["train", repo("recipes/tiny.yaml"), *FAST, "train.save_steps=1", "--output-dir", str(run_dir), "--wandb"]
    assert main(args) == 0
    record = json.loads((run_dir / "run.json").read_text())
    first = record["wandb"]
    # as if stopped after step 2 (a completed run has nothing left to resume)
    shutil.rmtree(run_dir / "checkpoints" / f"checkpoint-{record['global_step']}")
    (run_dir / "run.json").write_text(json.dumps({**record, "status": "interrupted"}))
    assert main([*args, "wandb.tags=[resumed]", "--resume"]) == 0
    second = json.loads((run_dir / "run.json").read_text())
    assert second["resumed_from"] and second["wandb"]["id"] == first["id"]
    folders = run_files(tmp_path / "wandb", first["id"])
    assert len(folders) == 2  # offline, every wandb.init writes a folder: run.json lists both, oldest first
    assert [(r["id"], r["job_type"], r["dir"]) for r in second["wandb"]["runs"]] == \
        [(first["id"], "train", str(p.parent)) for p in folders]


# ---------------------------------------------------------------- off, missing or failing


def train_tracked(tmp_path, *extra) -> tuple[int, dict | None, Path]:
    run_dir = tmp_path / "run"
    code = main(["train", repo("recipes/tiny.yaml"), *FAST, *PENALTIES, "--output-dir", str(run_dir), "--wandb", *extra])
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else None
    return code, run, run_dir


def assert_trained(code, run, run_dir):
    assert code == 0
    assert run["status"] == "completed" and run["global_step"] == 3
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def warnings_in(err: str) -> list[str]:
    """Our warning lines; progress bars share stderr and redraw themselves with carriage returns."""
    return [line for line in re.split(r"[\r\n]", err) if line.startswith("warning: W&B")]


def test_wandb_mode_disabled_trains_without_tracking(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    code, run, run_dir = train_tracked(tmp_path)
    assert_trained(code, run, run_dir)
    assert "wandb" not in run and not (tmp_path / "wandb").exists()
    assert not warnings_in(capsys.readouterr().err)


def test_wandb_init_failing_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, capsys):
    import wandb

    def refuse(*args, **kwargs):
        raise RuntimeError("W&B backend unreachable")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", refuse)
    code, run, run_dir = train_tracked(tmp_path)
    assert_trained(code, run, run_dir)
    assert "wandb" not in run
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1 and "start failed" in lines[0] and "unreachable" in lines[0], lines


def test_missing_wandb_import_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    code, run, run_dir = train_tracked(tmp_path)
    assert_trained(code, run, run_dir)
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1 and "import failed" in lines[0], lines


def test_disk_full_while_logging_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, capsys):
    import wandb
    from wandb.sdk.wandb_run import Run

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(Run, "log", full)
    try:
        code, run, run_dir = train_tracked(tmp_path)
    finally:
        wandb.teardown()  # the run given up on is still open in this process
    assert_trained(code, run, run_dir)
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1 and "No space left on device" in lines[0], lines


def test_eval_of_an_untracked_run_logs_nothing_unless_asked(tmp_path, monkeypatch):
    """results.json entries of a run trained without tracking: no W&B run by default."""
    results = {"suite": {"name": "s", "fingerprint": "f"}, "base": {"fingerprint": "b"},
               "entries": [{"name": "x", "run": str(tmp_path), "adapter": "a", "scale": 1.0, "metrics": {}}]}
    (tmp_path / "run.json").write_text(json.dumps({"recipe": {"name": "x"}}))
    monkeypatch.setattr(Tracker, "start", classmethod(lambda *a, **k: pytest.fail("started")))
    log_eval(results, tmp_path / "results.json")
    log_eval(results, tmp_path / "results.json", force=False)


# ---------------------------------------------------------------- names, groups, modes


def test_group_is_the_recipe_family():
    assert family(repo("recipes/tiny.yaml")) == "tiny"
    assert family(repo("recipes/tiny_all.yaml")) == "tiny"  # extends tiny.yaml
    assert family(repo("recipes/smollm2/kl_to_base.yaml")) == "smollm2"
    recipe = enable(load_recipe(repo("recipes/tiny_all.yaml")), repo("recipes/tiny_all.yaml"), on=True)
    assert recipe.wandb.group == "tiny" and recipe.wandb.project == "workbench"
    assert enable(load_recipe(repo("recipes/tiny.yaml")), repo("recipes/tiny.yaml")).wandb is None  # off by default


def test_run_name_hashes_what_trains_not_where_or_how_it_is_tracked():
    a = load_recipe(repo("recipes/tiny.yaml"))
    assert run_name(a) == f"tiny-{recipe_hash(a)}" and len(recipe_hash(a)) == 6
    same = load_recipe(repo("recipes/tiny.yaml"), ["train.output_dir=/elsewhere", "wandb.project=other"])
    other = load_recipe(repo("recipes/tiny.yaml"), ["regularizers.kl_to_base.weight=0.5"])
    assert run_name(same) == run_name(a) != run_name(other)
    assert run_name(load_recipe(repo("recipes/tiny.yaml"), ["wandb.name=mine"])) == "mine"
    assert run_name(resolved(other)) == run_name(other)


def test_wandb_section_is_validated_like_every_other_section():
    recipe = load_recipe(repo("recipes/tiny.yaml"), ["wandb.tags=[a, b]", "wandb.mode=offline"])
    assert recipe.wandb.tags == ["a", "b"] and resolved(recipe)["wandb"]["mode"] == "offline"
    with pytest.raises(UsageError, match=r"unknown key 'wandb.projct' \(did you mean 'project'\?\)"):
        load_recipe(repo("recipes/tiny.yaml"), ["wandb.projct=x"])
    with pytest.raises(UsageError, match="wandb.mode"):
        load_recipe(repo("recipes/tiny.yaml"), ["wandb.mode=sometimes"])


def test_offline_without_an_api_key_and_online_with_one(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    auto, online = WandbSection(), WandbSection(mode="online")
    assert not has_api_key() and resolve_mode(auto) == resolve_mode(online) == "offline"
    netrc = tmp_path / "home" / ".netrc"
    netrc.parent.mkdir(parents=True, exist_ok=True)
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    netrc.chmod(0o600)
    assert has_api_key() and resolve_mode(auto) == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a key for another server
    assert not has_api_key()
    monkeypatch.delenv("WANDB_BASE_URL")
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert resolve_mode(auto) == "online" and resolve_mode(WandbSection(mode="offline")) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins over the recipe
    assert resolve_mode(online) == "disabled"


def test_metric_names_map_to_wandb_keys():
    assert wandb_key("retention.general.ppl.ratio") == "retention/general/ppl/ratio"
    assert wandb_key("overfitting.mia.loss.auc") == "overfit/mia/loss/auc"
    assert wandb_key("learning.val_loss.delta") == "learning/val_loss/delta"
    assert trainer_key("eval_loss") == "eval/loss" and trainer_key("kl_to_base_weighted") == "train/kl_to_base_weighted"
    assert trainer_key("retention_ppl_ratio") == "retention/ppl_ratio" and trainer_key("retention_train_kl") == "retention/train_kl"
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": None, "f": {}}) == {"a.b": 1, "a.c.d": None, "e": None, "f": {}}


def test_metric_rows_put_base_tuned_and_the_change_with_its_ci_on_one_row():
    entry = {"name": "r", "scale": 1.0, "metrics": {
        "retention.mc.arith.acc.base": {"value": 0.5}, "retention.mc.arith.acc.tuned": {"value": 0.4},
        "retention.mc.arith.acc.delta": {"value": -0.1, "ci": [-0.2, 0.0]},
        "retention.general.kl": {"value": 0.01, "ci": [0.0, 0.02]},
        "learning.val_loss.delta": {"value": -0.3, "ci": [-0.4, -0.2]},
        "overfitting.loss_gap": {"value": 0.2}, "calibration.arith.ece.tuned": {"value": None}}}
    tables = metric_rows(Entry.model_validate(entry))
    assert ["r", 1.0, "arith", "acc", 0.5, 0.4, -0.1, -0.2, 0.0] in tables["retention"]
    assert ["r", 1.0, "general", "kl", None, None, 0.01, 0.0, 0.02] in tables["retention"]
    assert ["r", 1.0, "target", "val_loss", None, None, -0.3, -0.4, -0.2] in tables["learning"]
    assert ["r", 1.0, "target", "loss_gap", None, None, 0.2, None, None] in tables["overfit"]
    assert ["r", 1.0, "arith", "ece", None, None, None, None, None] in tables["calibration"]
