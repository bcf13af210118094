"""Faults as users meet them, through the command line: a run directory that holds another run,
a damaged converted model, a real full disk and a real read-only one, an adapter of another base,
a model with code of its own, and resuming before the first checkpoint. Each ends in one line of
its own, naming the file, key or module, never `failed: unexpected ...`.

The filesystem cases mount a real tmpfs (a full one, a read-only one) and skip where this
process may not mount."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, repo
from workbench.cli import main
from workbench.formats.integrity import check_folder, manifest_run, write_manifest
from workbench.formats.run_record import read_run
from workbench.modeling.tiny import tiny_model, tiny_tokenizer

TINY = repo("recipes/tiny.yaml")
SHORT = ["train.max_steps=4", "train.save_steps=2", "train.eval_steps=null", "data.val_fraction=0",
         "data.max_examples=48", "regularizers.lora_dropout=0"]
OTHER = [*SHORT, "train.learning_rate=1e-3", "lora.r=4"]  # another recipe, with other adapter shapes
PAGE = 4096


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def workbench(*argv, cwd=REPO) -> subprocess.CompletedProcess:
    """The real command in its own process: real progress bars, real signals, a real filesystem."""
    return subprocess.run([sys.executable, "-m", "workbench", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def assert_own_line(err: str, start: str) -> str:
    """The outcome line is a line of its own in a log file: it starts a line (no progress bar
    glued before it), and it is never the catch-all `unexpected`."""
    lines = [line for line in err.split("\n") if start in line]
    assert lines and all(line.startswith(start) for line in lines), err[-1500:]
    assert "unexpected" not in lines[-1], lines[-1]
    return lines[-1]


# ----------------------------------------------------------------- one run per directory

def test_a_run_directory_never_takes_another_runs_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", TINY, *SHORT, "--output-dir", run)[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    identity = read_run(run).identity
    assert {manifest_run(p) for p in (run / "checkpoints").iterdir()} == {identity}

    # a fresh run of another recipe into it: refused, nothing touched
    code, _, err = cli(capsys, "train", TINY, *OTHER, "--output-dir", run)
    assert code == 2 and last_line(err) == (
        f"error: {run}: holds another run (recipe 'tiny', completed, step 4; the recipe differs in section lora, "
        f"train): give another --output-dir, or remove {run} to start over")
    code, _, err = cli(capsys, "train", TINY, *OTHER, "--output-dir", run, "--resume")
    assert code == 2 and "the recipe changed since the run started (section lora, train)" in last_line(err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    # the state an older workbench left: another run's record over this run's newer checkpoint
    other = tmp_path / "other"
    assert cli(capsys, "train", TINY, *OTHER, "--output-dir", other)[0] == 0
    shutil.rmtree(other / "checkpoints" / "checkpoint-4")  # as if stopped after step 2
    shutil.copytree(run / "checkpoints" / "checkpoint-4", other / "checkpoints" / "checkpoint-4")
    record = json.loads((other / "run.json").read_text())
    record.update(status="interrupted", global_step=2)
    (other / "run.json").write_text(json.dumps(record))
    code, out, err = cli(capsys, "train", TINY, *OTHER, "--output-dir", other, "--resume")
    assert code == 0, err
    mine = read_run(other).identity
    assert (f"resume: skipping checkpoint-4: another run's checkpoint (run fingerprint {identity}; this run's is "
            f"{mine})") in out
    assert f"resume: from {other / 'checkpoints' / 'checkpoint-2'}" in out
    assert read_run(other).status == "completed" and read_run(other).global_step == 4

    # only the foreign checkpoint left: nothing is resumed
    shutil.rmtree(other / "checkpoints")
    shutil.copytree(run / "checkpoints" / "checkpoint-4", other / "checkpoints" / "checkpoint-4")
    record.update(status="interrupted")
    (other / "run.json").write_text(json.dumps(record))
    code, _, err = cli(capsys, "train", TINY, *OTHER, "--output-dir", other, "--resume")
    assert code == 2 and last_line(err).startswith(f"error: {other}: no checkpoint loads: checkpoint-4: another "
                                                   "run's checkpoint"), err


def test_a_fresh_run_of_the_same_recipe_starts_over_and_resume_finishes_a_completed_one(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", TINY, *SHORT, "--output-dir", run)[0] == 0
    code, out, _ = cli(capsys, "train", TINY, *SHORT, "--output-dir", run, "--resume")
    assert code == 0 and f"resume: {run}: the run completed at step 4; nothing to train" in out
    code, out, _ = cli(capsys, "train", TINY, *SHORT, "--output-dir", run)
    assert code == 0 and (f"train: {run} holds an earlier attempt of this run (recipe 'tiny', completed, step 4); "
                          "starting over from step 0; removing checkpoint-4, checkpoint-2") in out


def test_resume_before_the_first_checkpoint_starts_from_step_zero(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", TINY, *SHORT, "--output-dir", run, "--resume")
    assert code == 0, err
    assert f"resume: no checkpoint in {run / 'checkpoints'} yet; starting from step 0" in out
    assert read_run(run).status == "completed" and read_run(run).global_step == 4


# ----------------------------------------------------------------- models and adapters

def _model_dir(path: Path) -> Path:
    tiny_model(len(tiny_tokenizer())).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_a_damaged_converted_model_is_converted_again(tmp_path, capsys, monkeypatch):
    """The embedded default's conversion is stood in for by a tiny model (the real one is a
    90 MB download, tested in tests/modeling/test_load.py when marked slow); what is under test is
    that a damaged cache is found and rebuilt, by `assets` and by `train` alike."""
    from workbench.modeling import load

    conversions = []

    def convert(_gguf, out):
        conversions.append(out)
        _model_dir(out)
        write_manifest(out)

    monkeypatch.setattr(load, "download_gguf", lambda workdir, name: workdir / "model.gguf")
    monkeypatch.setattr(load, "_convert_gguf", convert)
    code, out, _ = cli(capsys, "assets")
    target = Path(out.split("model: ")[1].split()[0])
    assert code == 0 and len(conversions) == 1 and check_folder(target) is None

    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, out, err = cli(capsys, "assets")
    assert code == 0 and len(conversions) == 2 and check_folder(target) is None
    assert f"model: {weights}: " in err and "converting the model again" in err

    tokenizer = target / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])
    code, out, err = cli(capsys, "train", TINY, *SHORT, "model.name=smollm2-135m-instruct",
                         "--output-dir", tmp_path / "run")
    assert code == 0 and len(conversions) == 3 and f"model: {tokenizer}: " in err, err


def test_a_cut_tokenizer_in_a_model_directory_is_named(tmp_path, capsys):
    model = _model_dir(tmp_path / "model")
    (model / "tokenizer.json").write_text((model / "tokenizer.json").read_text()[:100])
    code, _, err = cli(capsys, "train", TINY, *SHORT, f"model.name={model}", "--output-dir", tmp_path / "run")
    assert code == 2 and last_line(err).startswith(f"error: {model / 'tokenizer.json'}: not a readable"), err
    assert "download or convert the model again" in last_line(err)


def test_an_adapter_of_another_base_names_the_module_and_both_shapes(tmp_path, capsys):
    run = tmp_path / "wide"
    assert cli(capsys, "train", TINY, *SHORT, "model.tiny.hidden_size=32", "--output-dir", run)[0] == 0
    adapter = Path(shutil.copytree(run / "adapter", tmp_path / "adapter"))  # from elsewhere: no run.json
    code, _, err = cli(capsys, "eval", "--suite", repo("evals/tiny.yaml"), "--base", "tiny-random-llama",
                       "--adapter", adapter, "--out", tmp_path / "results.json")
    line = last_line(err)
    assert code == 2 and line.startswith(f"error: {adapter / 'adapter_model.safetensors'}: does not fit this base "
                                         "model: model.layers.0.mlp.down_proj.lora_B is [32, 8], for a layer of "
                                         "32 outputs, but the base's model.layers.0.mlp.down_proj is [64, 128]"), line
    assert not (tmp_path / "results.json").exists()


def test_a_model_with_code_of_its_own_says_which_key_allows_it(tmp_path, capsys):
    model = _model_dir(tmp_path / "custom")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mymodel", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                  "AutoModelForCausalLM": "modeling_my.MyModel"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_my.py").write_text("raise SystemExit('this code must not run')\n")
    code, _, err = cli(capsys, "train", TINY, *SHORT, f"model.name={model}", "--output-dir", tmp_path / "run")
    assert code == 2 and last_line(err) == (
        f"error: model '{model}': its config names Python code of its own to build the model (configuration_my.py, "
        f"modeling_my.py in {model}); set model.trust_remote_code=true to allow it, which runs that code on this "
        "machine"), err


# ----------------------------------------------------------------- real filesystems

@contextlib.contextmanager
def tmpfs(path: Path, size: int, read_only: bool = False):
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // PAGE) * PAGE


@pytest.mark.skipif(shutil.which("mount") is None, reason="no mount command")
def test_a_disk_that_fills_while_torch_writes_a_checkpoint(tmp_path, capsys):
    """A real full filesystem: room for run.json, checkpoint-2 and checkpoint-4's adapter, and
    half of its optimizer.pt, which torch's own zip writer then fails on ("unexpected pos")."""
    reference = tmp_path / "reference"
    assert cli(capsys, "train", TINY, *SHORT, "--output-dir", reference)[0] == 0
    late = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin",
            "manifest.json"}
    four = reference / "checkpoints" / "checkpoint-4"
    room = (3 * _pages(reference / "run.json") + PAGE
            + sum(_pages(p) for p in (reference / "checkpoints" / "checkpoint-2").iterdir())
            + sum(_pages(p) for p in four.iterdir() if p.name not in late) + _pages(four / "optimizer.pt") // 2)
    with tmpfs(tmp_path / "disk", 4 << 20) as disk:
        filler = disk / "filler"
        filler.write_bytes(bytes(shutil.disk_usage(disk).free - room))
        run = disk / "run"
        done = workbench("train", TINY, *SHORT, "--output-dir", run)
        line = assert_own_line(done.stderr, "failed: ")
        assert done.returncode == 1 and line.startswith(
            f"failed: could not write {run / 'checkpoints' / 'checkpoint-4'} (no space left on device); newest "
            f"complete checkpoint: {run / 'checkpoints' / 'checkpoint-2'}; continue with: "), line
        assert line.endswith("--resume") and "Traceback" not in done.stderr
        record = read_run(run)
        assert record.status == "failed" and record.reason.startswith("could not write")
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]  # the torn one removed
        filler.unlink()
        done = workbench("train", TINY, *SHORT, "--output-dir", run, "--resume")
        assert done.returncode == 0, done.stderr[-1500:]
        assert read_run(run).status == "completed" and read_run(run).resumed_from.endswith("checkpoint-2")


@pytest.mark.skipif(shutil.which("mount") is None, reason="no mount command")
def test_a_read_only_output_directory(tmp_path):
    with tmpfs(tmp_path / "ro", 1 << 20, read_only=True) as disk:
        done = workbench("train", TINY, *SHORT, "--output-dir", disk / "run")
    line = assert_own_line(done.stderr, "failed: ")
    assert done.returncode == 1 and line == (f"failed: could not write {disk / 'run' / 'run.lock'} (read-only file "
                                             "system); nothing was written"), line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a directory without write permission")
def test_an_output_directory_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    done = workbench("train", TINY, *SHORT, "--output-dir", locked / "run")
    line = assert_own_line(done.stderr, "failed: ")
    assert done.returncode == 1 and line == (f"failed: could not write {locked / 'run' / 'run.lock'} (permission "
                                             "denied); nothing was written"), line
