"""The `workbench` command line: exit codes, one-line errors, and the train/fisher/recipes commands."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from workbench.cli import main
from tests.helpers import REPO, repo

TINY = REPO / "recipes" / "tiny.yaml"
FAST = ["train.max_steps=2", "data.max_examples=16", "data.val_fraction=0", "train.eval_steps=null"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO)  # `recipes` lists ./recipes; the recipe paths below are repo-relative


def one_error_line(capsys) -> str:
    """The single stderr line of a bad-input exit, checked to be `error: ...`."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("error: ") and lines[0].removeprefix("error: ").strip(), lines[0]
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- bad input: exit 2, one line


def misspelt_recipe(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"extends": str(TINY), "regularizers": {"kl_to_bse": {"weight": 1}}}))
    return [str(path)], ["kl_to_bse", "did you mean 'kl_to_base'"]


def wrong_type(tmp_path):
    return [repo("recipes/tiny.yaml"), "train.batch_size=abc"], ["train.batch_size", "abc"]


def missing_data_file(tmp_path):
    return [repo("recipes/tiny.yaml"), "data.train=/nonexistent/x.jsonl"], ["/nonexistent/x.jsonl", "not found"]


def malformed_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "Reverse: abc\nAnswer: ", "completion": "cba"})
    path.write_text(f'{good}\n{{"prompt": "x", "completion": \n{good}\n')
    return [repo("recipes/tiny.yaml"), f"data.train={path}"], [f"{path}:2:", "invalid JSON"]


def missing_recipe(tmp_path):
    path = tmp_path / "nope.yaml"
    return [str(path)], [str(path), "not found"]


def override_without_equals(tmp_path):
    # a positional override with no `=` reaches the recipe loader, which names it
    return [repo("recipes/tiny.yaml"), "train.max_steps"], ["'train.max_steps'", "key.path=value"]


def lora_layers_outside_the_model(tmp_path):
    return [repo("recipes/tiny.yaml"), "lora.layers=1-4"], ["lora.layers 1-4", "numbered 0-1"]


def init_data_with_no_text(tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"text": "too short"}) + "\n")
    return ([repo("recipes/tiny.yaml"), "lora.init=corda_kpm", f"lora.init_data={path}"],
            [str(path), "fewer than max_length=256"])


BAD_INPUTS = [misspelt_recipe, wrong_type, missing_data_file, malformed_jsonl, missing_recipe,
              override_without_equals, lora_layers_outside_the_model, init_data_with_no_text]


@pytest.mark.parametrize("command", ["train", "fisher"])
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(tmp_path, capsys, bad, command):
    args, expected = bad(tmp_path)
    target = tmp_path / "out"
    option = ["--output-dir", str(target)] if command == "train" else ["--out", str(target)]
    if command == "fisher":  # the fisher command needs reference data: only the bad input is wrong
        args = args + ["regularizers.ewc.reference=builtin:pydoc"]
    assert main([command, *args, *option]) == 2
    line = one_error_line(capsys)
    for part in expected:
        assert part in line, line
    assert not target.exists()


def test_fisher_without_reference_data_is_refused(tmp_path, capsys):
    out = tmp_path / "F.safetensors"
    assert main(["fisher", repo("recipes/tiny.yaml"), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "regularizers.ewc.reference" in line, line
    assert not out.exists()


def test_stray_argument_after_an_option_is_an_argparse_error(tmp_path, capsys):
    """After --output-dir, a word without `=` is not an override: argparse's usage error, exit 2."""
    target = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["train", repo("recipes/tiny.yaml"), "--output-dir", str(target), "train.max_steps"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: train.max_steps" in err
    assert not target.exists()


def test_unknown_option_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", repo("recipes/tiny.yaml"), "--max-steps=2"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --max-steps=2" in capsys.readouterr().err


def test_debug_shows_the_traceback_and_still_exits_2(tmp_path, capsys):
    target = tmp_path / "out"
    assert main(["--debug", "train", repo("recipes/tiny.yaml"), "data.train=/nonexistent/x.jsonl",
                 "--output-dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "UsageError" in err
    assert err.splitlines()[-1] == "error: /nonexistent/x.jsonl: data file not found"
    assert not target.exists()


def test_a_real_process_exits_2_with_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache")}
    target = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "workbench", "train", repo("recipes/tiny.yaml"), "train.batch_size=abc",
         "--output-dir", str(target)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.batch_size" in lines[0], result.stderr
    assert result.stdout == ""
    assert not target.exists()


# ---------------------------------------------------------------- recipes


def test_recipes_lists_every_shipped_recipe(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # `workbench recipes` lists ./recipes, relative to where it runs
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")
               if "accelerate" not in p.parts}
    assert shipped and listed == shipped
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "tiny-random-llama" in rows["recipes/tiny.yaml"]
    for term in ("weight_decay", "lora_dropout", "label_smoothing", "kl_to_base", "ewc", "delta_l2"):
        assert term in rows["recipes/tiny_all.yaml"]
    assert rows["recipes/tiny.yaml"].split()[-1] == "-"


def test_recipes_shows_one_recipe_resolved_as_yaml(capsys):
    assert main(["recipes", repo("recipes/tiny_all.yaml")]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    regs = shown["regularizers"]
    assert regs["kl_to_base"]["weight"] == 0.5
    assert regs["kl_to_base"]["warmup_steps"] == 5
    assert regs["kl_to_base"]["direction"] == "forward"  # a default, filled in
    assert regs["ewc"]["estimator"] == "kfac_diag" and regs["ewc"]["reference"] == "builtin:pydoc"
    assert regs["ewc"]["batch_size"] == 4  # a default, filled in
    assert shown["model"]["name"] == "tiny-random-llama"  # inherited through `extends`
    assert shown["name"] == "tiny_all" and "extends" not in shown


def test_recipes_applies_overrides_to_the_resolved_view(capsys):
    assert main(["recipes", repo("recipes/tiny_all.yaml"), "regularizers.ewc.estimator=diag"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["regularizers"]["ewc"]["estimator"] == "diag"


def test_recipes_keys_prints_each_key_with_type_default_and_description(capsys):
    assert main(["recipes", "--keys"]) == 0
    rows = {line.split()[0]: re.split(r"\s{2,}", line) for line in capsys.readouterr().out.splitlines()}
    assert "regularizers.kl_to_base.target_gain" in rows and "wandb.mode" in rows
    assert rows["train.learning_rate"] == [
        "train.learning_rate", "float > 0", "0.0002", "The peak learning rate, after warmup."]
    assert rows["data.train"][1:3] == ["str", "required"]
    assert main(["recipes", "--keys", "train.early_stopping"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "train.early_stopping", "train.early_stopping.patience", "train.early_stopping.min_delta"]


@pytest.mark.parametrize("argv, message", [
    (["recipes", "--keys", "trian"], "error: recipes --keys: no key 'trian' (did you mean 'train'?)"),
    (["recipes", "--keys", "train.early"], "error: recipes --keys: no key 'train.early'"),
    (["recipes", "recipes/tiny.yaml", "--keys"], "error: recipes --keys lists the schema's keys"),
])
def test_recipes_keys_refuses_an_unknown_section_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert one_error_line(capsys).startswith(message)


# ---------------------------------------------------------------- fisher, then train with it


def fisher_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("estimator", ["kfac_diag", "diag"])
def test_fisher_file_is_written_and_training_uses_it(tmp_path, capsys, estimator):
    fisher = tmp_path / "F.safetensors"
    assert main(["fisher", repo("recipes/tiny_all.yaml"), f"regularizers.ewc.estimator={estimator}",
                 "--out", str(fisher)]) == 0
    assert f"fisher: {fisher}" in capsys.readouterr().out
    meta = fisher_metadata(fisher)
    assert meta["estimator"] == estimator
    assert meta["model_fingerprint"] and meta["data_fingerprint"]
    with safe_open(str(fisher), framework="pt") as handle:
        suffixes = {key.rsplit(".", 1)[-1] for key in handle.keys()}
    assert suffixes == ({"diag"} if estimator == "diag" else {"g", "a"})

    run_dir = tmp_path / "run"
    # reference=null: the only way to a Fisher is the file, nothing can be re-estimated
    assert main(["train", repo("recipes/tiny_all.yaml"), f"regularizers.ewc.fisher={fisher}",
                 "regularizers.ewc.reference=null", f"regularizers.ewc.estimator={estimator}", *FAST,
                 "--output-dir", str(run_dir)]) == 0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and "ewc" in run["penalties"]
    assert run["fisher"]["data_fingerprint"] == meta["data_fingerprint"]
    assert run["fisher"]["model_fingerprint"] == meta["model_fingerprint"] == run["model_fingerprint"]
    assert run["fisher"]["estimator"] == estimator
    assert all(h["ewc"] >= 0 for h in run["history"] if "task_loss" in h)
    assert not (tmp_path / "cache" / "fisher").exists()  # the file was used, not the cache


@pytest.mark.parametrize("model_change, message", [
    # 2 heads of 32 with 1 kv head keeps every projection's shape: only the fingerprint differs
    (["model.tiny.num_attention_heads=2", "model.tiny.num_key_value_heads=1"], "another base model"),
    (["model.tiny.intermediate_size=96"], ""),  # other shapes
])
def test_fisher_from_another_base_model_is_refused(tmp_path, capsys, model_change, message):
    fisher = tmp_path / "F.safetensors"
    assert main(["fisher", repo("recipes/tiny_all.yaml"), "--out", str(fisher)]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "run"
    assert main(["train", repo("recipes/tiny_all.yaml"), f"regularizers.ewc.fisher={fisher}",
                 "regularizers.ewc.reference=null", *model_change, *FAST,
                 "--output-dir", str(run_dir)]) == 2
    line = one_error_line(capsys)
    assert str(fisher) in line and message in line, line
    assert not run_dir.exists()
    assert not run_dir.exists()


def test_missing_fisher_file_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    missing = tmp_path / "nope.safetensors"
    assert main(["train", repo("recipes/tiny_all.yaml"), f"regularizers.ewc.fisher={missing}",
                 "regularizers.ewc.reference=null", *FAST, "--output-dir", str(run_dir)]) == 2
    line = one_error_line(capsys)
    assert str(missing) in line and "not found" in line, line
    assert not run_dir.exists()


# ---------------------------------------------------------------- train


def test_train_help_exits_0_and_mentions_overrides(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "overrides" in out and "key.path=value" in out and "--output-dir" in out


def test_train_succeeds_and_honours_overrides_after_output_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", repo("recipes/tiny.yaml"), "train.max_steps=2", "--output-dir", str(run_dir),
                 "data.max_examples=16", "train.learning_rate=0.001", "train.eval_steps=null",
                 "data.val_fraction=0"]) == 0
    out = capsys.readouterr().out
    assert f"run: {run_dir / 'run.json'}" in out.splitlines()
    assert f"adapter: {run_dir / 'adapter'}" in out.splitlines()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["global_step"] == 2
    recipe = run["recipe"]
    assert recipe["train"]["max_steps"] == 2  # before the option
    assert recipe["train"]["learning_rate"] == 0.001 and recipe["data"]["max_examples"] == 16  # after it
    assert recipe["data"]["val_fraction"] == 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_unusable_output_paths_are_refused_with_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["train", repo("recipes/tiny.yaml"), "--output-dir", str(a_file)]) == 2
    assert "output directory is an existing file" in capsys.readouterr().err
    assert main(["fisher", repo("recipes/tiny_all.yaml"), "--out", str(tmp_path)]) == 2
    assert "--out is a directory" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_exit_1_and_debug_shows_the_traceback(monkeypatch, capsys):
    """A fault the workbench has no sentence for still ends in one line, naming the error's type and
    message; --debug adds the traceback for a bug report."""
    import workbench.cli.parser as parser

    def broken(args):
        raise KeyError("a key nobody expected")

    monkeypatch.setattr(parser, "cmd_recipes", broken)
    assert main(["recipes"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["failed: unexpected KeyError: 'a key nobody expected' (run again with --debug for the traceback)"]
    assert main(["--debug", "recipes"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err


def test_relative_data_paths_are_taken_from_the_working_directory_and_the_error_says_so(tmp_path, capsys,
                                                                                         monkeypatch):
    """`extends:` resolves from the recipe's directory; data paths, like overrides on the command
    line, from the working directory. A file found only beside the recipe is named with the path
    to give; a file found nowhere says where it was looked for."""
    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    (project / "recipes" / "data.jsonl").write_text(
        "".join(f'{{"prompt": "p{i} ", "completion": "c{i}"}}\n' for i in range(20)))
    recipe = project / "recipes" / "mine.yaml"
    recipe.write_text(f"extends: {repo('recipes/tiny.yaml')}\ndata:\n  train: data.jsonl\n")
    monkeypatch.chdir(project)
    assert main(["train", str(recipe), "train.max_steps=1", "--output-dir", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {recipe}: data.train: data.jsonl is not in the working directory ({project}), which relative "
        f"data paths are taken from; the recipe's directory has it: give {project / 'recipes' / 'data.jsonl'}")
    assert main(["train", str(recipe), "data.train=missing.jsonl", "--output-dir", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: missing.jsonl: data file not found (looked in {project}: relative paths are taken from the "
        "working directory)")
    assert main(["train", str(recipe), "data.train=recipes/data.jsonl", "train.max_steps=1",
                 "train.eval_steps=null", "--output-dir", str(tmp_path / "c")]) == 0
