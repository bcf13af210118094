"""`workbench eval` end to end on the tiny model: adapters saved to disk, loaded on one base."""

import json
import random

import pytest
import torch
import yaml

from workbench.formats import metrics as catalogue
from workbench.cli import main
from workbench.errors import UsageError
from workbench.evals.evaluate import run_eval
from workbench.io import fingerprint
from workbench.modeling.load import apply_lora, load_model, load_tokenizer, model_fingerprint
from workbench.config.recipe import load_recipe, resolved
from tests.helpers import repo

SUITE = {
    "name": "test", "batch_size": 8, "max_length": 96, "bootstrap": 50,
    "general": {"num_chunks": 6, "chunk_length": 32, "top_k": 300},
    "multiple_choice": [{"local": "mc.yaml"}],
    "target": {"num_examples": 8, "max_new_tokens": 12},
    "overfitting": {"num_examples": 8},
}


def write_task(directory, n=12):
    rng = random.Random(0)
    docs = [{"question": f"{a} plus {b}?", "choices": [str(a + b), str(a + b + 1), "many"], "gold": rng.randint(0, 2)}
            for a, b in ((rng.randint(1, 9), rng.randint(1, 9)) for _ in range(n))]
    (directory / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "mc.yaml").write_text(yaml.safe_dump({
        "task": "mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "mc.jsonl"}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}"}))


def make_run(directory, name, perturb=0.1, seed=0, overrides=()):
    """A finished run of recipes/tiny.yaml without training: LoRA B set to noise (or left at 0)."""
    recipe = load_recipe(repo("recipes/tiny.yaml"), [f"name={name}", *overrides])
    tokenizer = load_tokenizer(recipe.model)
    model, tokenizer = load_model(recipe.model, tokenizer)
    base_fp = model_fingerprint(model)
    torch.manual_seed(seed)
    model = apply_lora(model, recipe.lora, 0.0)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.copy_(torch.randn_like(param) * perturb)
    run_dir = directory / name
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    (run_dir / "run.json").write_text(json.dumps({"status": "completed", "recipe": resolved(recipe),
                                                  "model_fingerprint": base_fp, "adapter": "adapter"}))
    return run_dir


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_task(root)
    (root / "suite.yaml").write_text(yaml.safe_dump(SUITE))
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


def values(entry):
    return {name: m["value"] for name, m in entry["metrics"].items()}


def test_unchanged_adapter_is_reported_and_scores_as_the_base(workspace, cache):
    run = make_run(workspace, "zero", perturb=0.0)
    results = run_eval(workspace / "suite.yaml", runs=[run])
    entry = results["entries"][0]
    v = values(entry)
    assert entry["changes_model"] is False and entry["delta_norm"] == 0.0
    assert v["retention.general.kl"] == pytest.approx(0.0, abs=1e-6)
    assert v["retention.general.kl_upper"] == pytest.approx(0.0, abs=1e-6)
    assert v["retention.general.ppl.ratio"] == pytest.approx(1.0, abs=1e-9)
    assert v["retention.general.top1_agreement"] == 1.0
    assert v["retention.mc.all.acc.delta"] == 0.0 and v["calibration.all.ece.delta"] == pytest.approx(0.0, abs=1e-12)
    assert v["learning.val_loss.delta"] == pytest.approx(0.0, abs=1e-9)
    # members and non-members come from one distribution and the adapter learned nothing
    assert v["overfitting.mia.loss_ratio.auc"] == 0.5  # every ratio is exactly 1: all ties
    assert 0.2 <= v["overfitting.mia.loss.auc"] <= 0.8


def test_second_adapter_runs_no_base_forward_passes(workspace, cache):
    first = run_eval(workspace / "suite.yaml", runs=[make_run(workspace, "one", seed=1)])
    assert first["base"]["forward_calls"]["base"] > 0
    assert set(first["base"]["cache"]["misses"]) == {"general", "mc:mc", "target"}
    second = run_eval(workspace / "suite.yaml", runs=[make_run(workspace, "two", seed=2)])
    assert second["base"]["forward_calls"]["base"] == 0
    assert set(second["base"]["cache"]["hits"]) == {"general", "mc:mc", "target"}
    assert second["base"]["forward_calls"]["tuned"] > 0
    # cached base values are the ones computed fresh
    a, b = values(first["entries"][0]), values(second["entries"][0])
    for name in ("retention.general.ppl.base", "retention.mc.mc.acc.base", "learning.val_loss.base"):
        assert a[name] == b[name]
    uncached = run_eval(workspace / "suite.yaml", runs=[make_run(workspace, "two", seed=2)], use_cache=False)
    assert values(uncached["entries"][0]) == pytest.approx(b)


def test_scale_sweep_interpolates_to_the_base(workspace, cache, tmp_path):
    suite = dict(SUITE, scales=[0.0, 0.5])
    (workspace / "sweep.yaml").write_text(yaml.safe_dump(suite))
    results = run_eval(workspace / "sweep.yaml", runs=[make_run(workspace, "sweep", seed=3)])
    by_name = {e["name"]: values(e) for e in results["entries"]}
    assert set(by_name) == {"sweep", "sweep@0.5", "sweep@0"}
    assert by_name["sweep@0"]["retention.general.kl"] == pytest.approx(0.0, abs=1e-6)
    assert by_name["sweep@0"]["retention.general.ppl.ratio"] == pytest.approx(1.0, abs=1e-9)
    kl = [by_name[n]["retention.general.kl"] for n in ("sweep@0", "sweep@0.5", "sweep")]
    assert kl[0] < kl[1] < kl[2]


def test_several_runs_share_one_base_and_write_results(workspace, cache, tmp_path):
    runs = [make_run(workspace, "r1", seed=4), make_run(workspace, "r2", seed=5)]
    out = tmp_path / "results.json"
    assert main(["eval", "--suite", str(workspace / "suite.yaml"), "--run", str(runs[0]),
                 "--run", str(runs[1]), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [e["name"] for e in results["entries"]] == ["r1", "r2"]
    assert values(results["entries"][0]) != values(results["entries"][1])
    written = {name for e in results["entries"] for name in e["metrics"]}
    assert written and [name for name in written if not catalogue.is_metric(name)] == []
    assert {n.split(".")[0] for n in written} == {"learning", "retention", "overfitting", "calibration"}
    curves = {name for e in results["entries"] for name in e["curves"]}
    assert curves and all(any(c.regex.fullmatch(name) for c in catalogue.CURVES) for name in curves)


@pytest.mark.parametrize("case", ["missing_task", "empty_task", "tokenizer", "empty_heldout", "not_a_run",
                                  "other_base"])
def test_bad_input_is_one_line_exit_2(workspace, cache, tmp_path, capsys, case):
    suite = dict(SUITE)
    run = make_run(tmp_path, "bad")
    if case == "missing_task":
        suite["multiple_choice"] = [{"local": "nowhere.yaml"}]
    elif case == "empty_task":
        (workspace / "empty.jsonl").write_text("")
        task = yaml.safe_load((workspace / "mc.yaml").read_text())
        task["dataset_kwargs"]["data_files"]["test"] = "empty.jsonl"
        (workspace / "empty.yaml").write_text(yaml.safe_dump(task))
        suite["multiple_choice"] = [{"local": "empty.yaml"}]
    elif case == "tokenizer":
        config = json.loads((run / "adapter" / "tokenizer.json").read_text())
        config["added_tokens"].append({**config["added_tokens"][-1], "id": 400, "content": "<|extra|>"})
        (run / "adapter" / "tokenizer.json").write_text(json.dumps(config))
    elif case == "empty_heldout":
        (tmp_path / "none.jsonl").write_text("")
        suite["target"] = {"heldout": str(tmp_path / "none.jsonl")}
    elif case == "not_a_run":
        (run / "run.json").unlink()
    elif case == "other_base":
        record = json.loads((run / "run.json").read_text())
        record["model_fingerprint"] = fingerprint("another model")
        (run / "run.json").write_text(json.dumps(record))
    (workspace / f"{case}.yaml").write_text(yaml.safe_dump(suite))
    out = tmp_path / "results.json"
    code = main(["eval", "--suite", str(workspace / f"{case}.yaml"), "--run", str(run), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_bad_suite_key_has_a_suggestion(tmp_path):
    from workbench.evals.suite import load_suite

    (tmp_path / "s.yaml").write_text("name: x\ngeneral: {num_chunk: 3}\n")
    with pytest.raises(UsageError, match=r"s.yaml: unknown key 'general.num_chunk' \(did you mean 'num_chunks'\?\)"):
        load_suite(tmp_path / "s.yaml")
    (tmp_path / "t.yaml").write_text("name: x\nmultiple_choice: [{bigbench: a, local: b}]\n")
    with pytest.raises(UsageError, match="exactly one of"):
        load_suite(tmp_path / "t.yaml")


# ---------------------------------------------------------------- trajectories


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """recipes/tiny.yaml trained 4 steps with a checkpoint every 2: checkpoint-2 and checkpoint-4."""
    from workbench.training.run import train

    out = tmp_path_factory.mktemp("trained") / "traj"
    recipe = load_recipe(repo("recipes/tiny.yaml"), ["name=traj", "train.max_steps=4", "train.save_steps=2",
                                               "data.max_examples=48", "train.eval_steps=null"])
    return train(recipe, out)


def test_checkpoints_are_entries_scored_like_the_adapter_alone(workspace, cache, trained):
    suite = {**SUITE, "checkpoints": "all", "scales": [0.5]}
    (workspace / "traj.yaml").write_text(yaml.safe_dump(suite))
    results = run_eval(workspace / "traj.yaml", runs=[trained])
    entries = {e["name"]: e for e in results["entries"]}
    # the final adapter (step 4) with its scale sweep, and checkpoint 2; checkpoint 4 is the final adapter
    assert set(entries) == {"traj", "traj@0.5", "traj:step2"}
    assert [(entries[n]["step"], entries[n]["family"], entries[n]["seed"]) for n in ("traj", "traj:step2")] == \
        [(4, "traj", 0), (2, "traj", 0)]
    assert values(entries["traj:step2"]) != values(entries["traj"])  # two steps of training apart

    alone = run_eval(workspace / "suite.yaml", base="tiny-random-llama",
                     adapters=[trained / "checkpoints" / "checkpoint-2"])
    assert alone["base"]["forward_calls"]["base"] == 0  # the base side was cached by the first eval
    # a bare adapter has no run.json, so no target split: general text, multiple choice, calibration
    by_itself, in_run = values(alone["entries"][0]), values(entries["traj:step2"])
    assert {n.split(".")[0] for n in by_itself} == {"retention", "calibration"}
    assert by_itself == {name: in_run[name] for name in by_itself}


def test_the_base_is_scored_once_for_every_checkpoint(workspace, tmp_path, monkeypatch, trained):
    """Forward passes with the adapter off do not grow with the number of entries."""
    counts = {}
    for checkpoints in ([], "all"):
        monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / f"cache-{len(checkpoints)}"))
        (workspace / "base_once.yaml").write_text(yaml.safe_dump({**SUITE, "checkpoints": checkpoints}))
        results = run_eval(workspace / "base_once.yaml", runs=[trained])
        counts[len(results["entries"])] = results["base"]["forward_calls"]
    assert set(counts) == {1, 2}
    assert counts[2]["base"] == counts[1]["base"] > 0
    assert counts[2]["tuned"] > counts[1]["tuned"]


def test_a_missing_checkpoint_step_is_one_line(workspace, cache, trained):
    (workspace / "missing.yaml").write_text(yaml.safe_dump({**SUITE, "checkpoints": [2, 3]}))
    with pytest.raises(UsageError, match=r"no checkpoint at step 3 \(saved: 2, 4; see train.save_steps\)"):
        run_eval(workspace / "missing.yaml", runs=[trained])


def test_a_recipe_family_names_the_entry_s_family(workspace, cache):
    """A lower learning rate is a free way to train less: its recipe says `family: baseline`, so
    its entries pool into the baseline's points in `workbench compare`; without it, the name."""
    runs = [make_run(workspace, "slow", seed=6, overrides=["family=baseline"]), make_run(workspace, "own", seed=7)]
    results = run_eval(workspace / "suite.yaml", runs=runs)
    assert [(e["name"], e["family"]) for e in results["entries"]] == [("slow", "baseline"), ("own", "own")]


def test_light_points_measure_learning_and_general_text_as_the_full_suite_does(workspace, tmp_path, monkeypatch,
                                                                               trained):
    """With light_points, scale and checkpoint entries carry only the learning and general-text
    metrics, with the values the full suite gives them; the final adapter keeps everything; and
    the light points cost fewer tuned forward passes (no multiple choice, no generation)."""
    results, calls = {}, {}
    for light in (False, True):
        monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / f"cache-{light}"))
        (workspace / "light.yaml").write_text(yaml.safe_dump(
            {**SUITE, "checkpoints": "all", "scales": [0.5], "light_points": light}))
        out = run_eval(workspace / "light.yaml", runs=[trained])
        results[light] = {e["name"]: e for e in out["entries"]}
        calls[light] = out["base"]["forward_calls"]
    full, light = results[False], results[True]
    assert [light[n]["light"] for n in ("traj", "traj@0.5", "traj:step2")] == [False, True, True]
    assert not any(e["light"] for e in full.values())
    assert values(light["traj"]) == values(full["traj"])
    for name in ("traj@0.5", "traj:step2"):
        kept = values(light[name])
        assert {n.rpartition(".")[0] for n in kept} == {
            "learning.val_loss", "learning.val_ppl", "retention.general.ppl", "retention.general",
        }
        assert kept == {n: values(full[name])[n] for n in kept}  # the same numbers, fewer of them
        assert len(values(full[name])) > len(kept) + 20  # multiple choice, calibration, overfitting dropped
    assert calls[True]["base"] == calls[False]["base"]
    assert calls[True]["tuned"] < calls[False]["tuned"]


def test_entries_carry_per_item_scores_that_reproduce_their_metrics(workspace, cache, tmp_path):
    """Schema 2: each entry stores per-chunk, per-item and per-example scores, keyed by a
    fingerprint of the items, from which compare recomputes every learning and retention metric
    (to the 7 digits they are stored with); the written file reads back."""
    from workbench.compare.items import Resample
    from workbench.formats.results import SCHEMA_VERSION, load_results

    suite = dict(SUITE, scales=[0.5], light_points=True)
    (workspace / "items.yaml").write_text(yaml.safe_dump(suite))
    out = tmp_path / "results.json"
    results = run_eval(workspace / "items.yaml", runs=[make_run(workspace, "itemised", seed=8)], out=out)
    assert results["schema_version"] == SCHEMA_VERSION == 2 and load_results(out).entries
    full, light = results["entries"]
    assert set(full["items"]) == {"general", "mc", "target"} and set(light["items"]) == {"general", "target"}
    assert len(full["items"]["general"]["kl"]) == SUITE["general"]["num_chunks"]
    assert len(full["items"]["mc"]["mc"]["acc_tuned"]) == 12 and set(full["items"]["mc"]["mc"]["acc_tuned"]) <= {0, 1}
    assert len(full["items"]["target"]["tuned_nll"]) == SUITE["target"]["num_examples"]
    assert full["items"]["general"]["key"] == light["items"]["general"]["key"]  # the same chunks: paired
    resample = Resample([e["items"] for e in results["entries"]], replicates=10)
    for i, entry in enumerate(results["entries"]):
        recomputed = {n: resample.point(i, n) for n in entry["metrics"]}
        recomputed = {n: v for n, v in recomputed.items() if v is not None}
        assert {"learning.val_loss.tuned", "retention.general.ppl.ratio", "retention.general.kl"} <= set(recomputed)
        assert (i == 1) or {"retention.mc.all.acc.delta", "learning.exact_match.tuned"} <= set(recomputed)
        for name, value in recomputed.items():
            # a delta of two rounded sums (~300 nats each here) keeps ~1e-7 nats/token
            assert value == pytest.approx(entry["metrics"][name]["value"], rel=1e-6, abs=1e-6), name


def test_a_bare_adapter_with_its_training_data_gets_every_overfitting_metric(tmp_path, capsys, monkeypatch):
    """An adapter from elsewhere (no run.json) has no training data: the eval says in one line
    what it cannot measure and a gate that needs it fails naming why; with `--train-data` it gets
    membership inference and extraction, and passes a lenient gate."""
    import shutil

    from tests.helpers import repo
    from workbench.cli import main
    from workbench.config.recipe import load_recipe
    from workbench.training.run import train

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    run = train(load_recipe(repo("recipes/tiny.yaml"), ["train.max_steps=20", "train.eval_steps=null"]),
                tmp_path / "run")
    adapter = shutil.copytree(run / "adapter", tmp_path / "plain")  # as if from elsewhere
    suite = tmp_path / "suite.yaml"
    words = ["".join("qwertyuiopasdfghjklzxcvbnm"[(7 * i + 3 * j) % 26] for j in range(5)) for i in range(20)]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"prompt": f"Reverse: {w}\nAnswer: ",
                                                                 "completion": w[::-1]}) + "\n" for w in words))
    suite.write_text("name: bare\nbatch_size: 16\nmax_length: 64\nbootstrap: 50\ngeneral: null\n"
                     "target:\n  heldout: heldout.jsonl\n  num_examples: 16\n  max_new_tokens: 8\n"
                     "overfitting:\n  num_examples: 16\n")
    policy = tmp_path / "lenient.yaml"
    policy.write_text("name: lenient\nrules:\n  - {metric: overfitting.mia.loss.auc, max: 0.99}\n"
                      "  - {metric: overfitting.extraction.gap, max: 1.0}\n")
    bare = ["eval", "--suite", str(suite), "--base", "tiny-random-llama", "--adapter", str(adapter)]

    assert main([*bare, "--out", str(tmp_path / "without.json")]) == 0
    out = capsys.readouterr().out
    assert (f"eval: {adapter.name}: no training data (give eval --train-data FILE, or the suite's target.train), so "
            "overfitting.* is not measured") in out
    assert main(["gate", str(tmp_path / "without.json"), "--policy", str(policy)]) == 1
    assert "overfitting.mia.loss.auc missing (the rule says missing: fail)" in capsys.readouterr().out

    assert main([*bare, "--train-data", "builtin:tiny_reverse", "--out", str(tmp_path / "with.json")]) == 0
    assert "no training data" not in capsys.readouterr().out
    metrics = json.loads((tmp_path / "with.json").read_text())["entries"][0]["metrics"]
    for name in ("overfitting.mia.loss.auc", "overfitting.mia.min_k.auc", "overfitting.mia.loss_ratio.auc",
                 "overfitting.extraction.gap"):
        assert metrics[name]["value"] is not None, name
    assert main(["gate", str(tmp_path / "with.json"), "--policy", str(policy)]) == 0
