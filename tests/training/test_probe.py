"""The retention probe (`train.retention_probe`) and checkpoint selection (`train.select`): the
probe's values are `workbench eval`'s, the training-batch KL is the KL-to-base penalty's, the
selected adapter is the best checkpoint within the budget, bad input is one line."""

import json

import pytest
import yaml

import workbench.training.run as run
from tests.helpers import repo
from workbench.cli import main
from workbench.config.recipe import Select, load_recipe
from workbench.training.select import choose

TINY = repo("recipes/tiny.yaml")
# four 64-token chunks, probed every 10 steps; checkpoints (and evaluations) every 10 of 30 steps
PROBE = ["train.retention_probe.chunk_length=64", "train.retention_probe.every=10", "train.save_steps=10",
         "train.logging_steps=5"]
POINTS = ("ppl_ratio", "ppl", "kl", "kl_upper", "top1_agreement")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


def history(run_dir) -> list[dict]:
    return json.loads((run_dir / "run.json").read_text())["history"]


def probes(run_dir) -> dict[int, dict]:
    return {h["step"]: h for h in history(run_dir) if "retention_ppl_ratio" in h}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """The tiny recipe with the probe, no selection: probes at steps 10, 20, 30."""
    root = tmp_path_factory.mktemp("probed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_CACHE", str(root / "cache"))
        out = run.train(load_recipe(TINY, PROBE), root / "run")
    return out


def test_the_probe_is_the_eval(probed, tmp_path, monkeypatch):
    """At the last step the probe's values equal `workbench eval`'s general-text metrics on the same
    chunks (1e-5), and the eval reads the base side the probe cached. Negative control: the probe at
    step 20, one checkpoint earlier, is off the eval by more than the tolerance on every metric."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(probed.parent / "cache"))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "probe", "general": {"num_chunks": 4, "chunk_length": 64},
                                     "target": None, "overfitting": None}))
    assert main(["eval", "--run", str(probed), "--suite", str(suite), "--out", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["base"]["cache"] == {"hits": ["general"], "misses": []}
    metrics = {k: v["value"] for k, v in results["entries"][0]["metrics"].items()}
    evald = {"ppl_ratio": metrics["retention.general.ppl.ratio"], "ppl": metrics["retention.general.ppl.tuned"],
             **{name: metrics[f"retention.general.{name}"] for name in ("kl", "kl_upper", "top1_agreement")}}
    seen = probes(probed)
    assert sorted(seen) == [10, 20, 30]
    for name in POINTS:
        assert seen[30][f"retention_{name}"] == pytest.approx(evald[name], rel=1e-5, abs=1e-7), name
    for name in ("ppl_ratio", "kl", "kl_upper"):
        assert seen[20][f"retention_{name}"] != pytest.approx(evald[name], rel=1e-5, abs=1e-7), name
    assert all(0 < p["retention_seconds"] < 60 for p in seen.values())


def test_the_training_batch_kl_is_the_kl_penalty_on_the_logged_step(tmp_path):
    """retention_train_kl, logged every 5 steps with the KL penalty off, equals the KL-to-base term
    (tested against a torch reference in test_kl.py) of a run that carries the penalty at a weight
    of 1e-12 and logs every step, at the same steps. Negative control: averaging the monitor over
    the 5 steps since the last log (it measures only the logged step) would be off by 5x."""
    monitored = run.train(load_recipe(TINY, ["train.retention_probe.chunk_length=64", "train.logging_steps=5",
                                             "train.max_steps=15", "train.eval_steps=null", "data.val_fraction=0"]),
                          tmp_path / "monitored")
    penalised = run.train(load_recipe(TINY, ["regularizers.kl_to_base.weight=1e-12", "train.max_steps=15",
                                             "train.eval_steps=null", "data.val_fraction=0"]),
                          tmp_path / "penalised")
    kl = {h["step"]: h["kl_to_base"] for h in history(penalised) if "kl_to_base" in h}
    logged = {h["step"]: h["retention_train_kl"] for h in history(monitored) if "retention_train_kl" in h}
    assert sorted(logged) == [5, 10, 15] and all(v > 0.01 for v in logged.values())
    for step, value in logged.items():
        assert value == pytest.approx(kl[step], rel=1e-5)
        assert value / 5 != pytest.approx(kl[step], rel=1e-5)


# ---------------------------------------------------------------- selection


def test_choose_against_a_hand_made_history():
    """Bounds kl <= 0.3 and ppl_ratio <= 1.1: step 10 meets both, 20 breaks kl, 30 meets both with a
    lower eval_loss than 10, 40 has no probe. The choice is 30; with kl <= 0.15 none meets."""
    history = [{"step": 10, "retention_kl": 0.1, "retention_ppl_ratio": 1.0}, {"step": 10, "eval_loss": 2.0},
               {"step": 20, "retention_kl": 0.4, "retention_ppl_ratio": 1.05}, {"step": 20, "eval_loss": 1.0},
               {"step": 30, "retention_kl": 0.25, "retention_ppl_ratio": 1.08}, {"step": 30, "eval_loss": 1.5},
               {"step": 40, "eval_loss": 0.5}]
    select = Select(subject_to={"retention_kl": 0.3, "retention_ppl_ratio": 1.1})
    chosen = choose(history, [40, 10, 30, 20], select)
    assert chosen["step"] == 30
    assert [c["meets"] for c in chosen["candidates"]] == [True, False, True, False]
    assert chosen["candidates"][1]["breaks"] == ["retention_kl"]
    assert chosen["candidates"][3]["missing"] == ["retention_kl", "retention_ppl_ratio"]
    assert "2 of 4 checkpoints" in chosen["reason"]
    assert choose(history, [10, 20, 30, 40], Select(subject_to={"retention_kl": 0.15}))["step"] == 10
    assert choose(history, [10, 20, 30, 40], Select(subject_to={"retention_kl": 0.05}))["step"] is None


def test_a_budget_that_excludes_the_last_checkpoint_selects_an_earlier_one(probed, tmp_path):
    """The same run under a bound on retention_kl just below its value at step 30 (checked to be the
    largest): the run trains as before, every checkpoint is kept, and adapter/ is byte for byte the
    checkpoint with the lowest eval_loss among steps 10 and 20, which run.json names."""
    kl = {step: p["retention_kl"] for step, p in probes(probed).items()}
    assert kl[30] > max(kl[10], kl[20]), kl  # the tiny run drifts away from the base
    bound = (kl[30] + max(kl[10], kl[20])) / 2
    out = run.train(load_recipe(TINY, [*PROBE, f"train.select.subject_to={{retention_kl: {bound!r}}}"]),
                    tmp_path / "selected")
    record = json.loads((out / "run.json").read_text())
    assert {s: p["retention_kl"] for s, p in probes(out).items()} == pytest.approx(kl, rel=1e-6)
    losses = {h["step"]: h["eval_loss"] for h in record["history"] if "eval_loss" in h}
    expected = min((10, 20), key=lambda s: losses[s])
    assert record["status"] == "completed" and record["adapter_step"] == record["selection"]["step"] == expected
    assert [c["meets"] for c in record["selection"]["candidates"]] == [True, True, False]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert adapter == (out / "checkpoints" / f"checkpoint-{expected}" / "adapter_model.safetensors").read_bytes()
    assert adapter != (out / "checkpoints" / "checkpoint-30" / "adapter_model.safetensors").read_bytes()
    assert not (out / "adapter" / "optimizer.pt").exists()


def test_no_checkpoint_within_the_budget_fails_and_keeps_every_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", TINY, "--output-dir", str(out), *PROBE, "train.max_steps=20",
                 "train.select.subject_to={retention_kl: 1.0e-6}"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("failed: train.select: none of the 2 checkpoints has retention_kl <= 1e-06; "
                          "the lowest retention_kl was ")
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["selection"]["step"] is None
    assert not (out / "adapter").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20"]


@pytest.mark.parametrize("overrides, message", [
    (["train.select.subject_to={retention_kl: 0.05}"], "train.select needs train.retention_probe"),
    (["train.retention_probe.every=5", "train.select.subject_to={retention_kl: 0}"], "bounds must be positive"),
    (["train.retention_probe.every=5", "train.select.subject_to={kl: 0.1}"], "train.select.subject_to.kl"),
    (["train.retention_probe.every=0"], "train.retention_probe.every"),
    (["train.retention_probe.source=missing.txt"], "train.retention_probe.source: missing.txt"),
    (["train.retention_probe.every=5", "train.select.metric=eval_loss", "data.val_fraction=0"],
     "train.select.metric eval_loss needs validation data"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["train", TINY, "--output-dir", str(out), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("sharded", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_the_probe_is_refused_in_one_line_under_sharded_weights(sharded):
    """FSDP and DeepSpeed (ZeRO-2 and 3 alike: the trainer does not tell them apart) refuse the probe
    before it scores anything, in one line naming the key and the way to measure instead; DDP does not."""
    from types import SimpleNamespace

    from workbench.errors import UsageError
    from workbench.training.probe import RetentionProbeCallback

    with pytest.raises(UsageError) as refused:
        RetentionProbeCallback(SimpleNamespace(**{sharded: True}), None, [], "")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("train.retention_probe: ") and "workbench eval" in message
    with pytest.raises(AttributeError):  # no refusal: it goes on to read the trainer's tokenizer
        RetentionProbeCallback(SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False), None, [], "")
