"""Faults during training: a NaN stops the run naming it, SIGTERM checkpoints, SIGKILL resumes."""

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, assert_adapters_match, repo
from workbench.errors import RunFailed, UsageError
from workbench.config.recipe import load_recipe
from workbench.training.regularizers import Penalty, PenaltyConfig
from workbench.training.faults import latest_checkpoint
from workbench.training.run import build_trainer, train

# deterministic: no dropout, no NEFTune noise; a checkpoint every 2 steps
COMMON = ["train.max_steps=8", "train.save_steps=2", "train.eval_steps=null", "data.val_fraction=0",
          "data.max_examples=64", "regularizers.lora_dropout=0", "regularizers.kl_to_base.warmup_steps=0"]
RECIPE = repo("recipes/tiny_all.yaml")

# Runs training in a child process with a callback that sends itself a signal at a given step.
CHILD = textwrap.dedent("""
    import signal, sys
    from tests.helpers import signal_at_step
    from workbench.cli import main

    signal_at_step(int(sys.argv[1]), getattr(signal, sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
""")


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    train(load_recipe(RECIPE, COMMON), out)
    return out


def child(tmp_path, step, signame, out):
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled",
           "PYTHONPATH": str(REPO)}  # for tests.helpers, from any working directory
    cmd = [sys.executable, "-c", CHILD, str(step), signame, "train", RECIPE, "--output-dir", str(out), *COMMON]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_at_a_random_step_then_resume_gives_the_same_adapter(tmp_path, uninterrupted):
    step = random.randint(3, 7)
    out = tmp_path / "run"
    done = child(tmp_path, step, "SIGKILL", out)
    assert done.returncode == -9, done.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # whole, not torn
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and int(checkpoint.name.split("-")[1]) == 2 * ((step - 1) // 2)
    train(load_recipe(RECIPE, COMMON), out, resume=True)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed" and record["global_step"] == 8, f"killed at step {step}"
    assert record["resumed_from"] == str(checkpoint)
    assert_adapters_match(adapter(uninterrupted), adapter(out), rtol=1e-5, atol=1e-7, norm_tol=1e-6,
                          min_close=1.0)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, uninterrupted):
    out = tmp_path / "run"
    done = child(tmp_path, 3, "SIGTERM", out)
    assert done.returncode == 128 + 15, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "stopped by SIGTERM at step 3" in done.stderr and "--resume" in done.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["reason"].startswith("stopped by SIGTERM at step 3")
    assert latest_checkpoint(out).name == "checkpoint-3"  # the step in flight finished and was saved
    train(load_recipe(RECIPE, COMMON), out, resume=True)
    assert_adapters_match(adapter(uninterrupted), adapter(out), rtol=1e-5, atol=1e-7, norm_tol=1e-6,
                          min_close=1.0)


def test_a_torn_checkpoint_is_passed_over(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        path = tmp_path / "checkpoints" / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text('{"global_step": %d}' % step if complete else '{"glo')
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"


def test_resume_refuses_a_changed_recipe(tmp_path, uninterrupted):
    with pytest.raises(UsageError, match=r"recipe changed since the run started \(section train\)"):
        train(load_recipe(RECIPE, COMMON + ["train.learning_rate=0.1"]), uninterrupted, resume=True)


class Poison(Penalty):
    """A penalty that turns NaN from a given step on: a poisoned batch as far as the loss can tell."""

    name = "poison"
    per_token = False

    def __init__(self, from_step: int, gradient_only: bool = False):
        super().__init__(PenaltyConfig(weight=1.0))
        self.from_step, self.gradient_only, self.step = from_step, gradient_only, 0

    def term(self, model, inputs, base):
        self.step += 1
        param = next(p for p in model.parameters() if p.requires_grad)
        if self.step < self.from_step:
            return param.sum() * 0.0
        if self.gradient_only:  # finite value, infinite slope: sqrt at 0
            return (param.sum() * 0.0).abs().sqrt()
        return param.sum() * float("nan")


@pytest.mark.parametrize("gradient_only", [False, True])
def test_nan_injection_names_the_fault_and_keeps_the_last_checkpoint(tmp_path, gradient_only):
    recipe = load_recipe(RECIPE, COMMON)
    trainer, _ = build_trainer(recipe, tmp_path)
    trainer.penalties.append(Poison(from_step=5, gradient_only=gradient_only))
    expected = "non-finite gradient" if gradient_only else "non-finite poison=nan"
    with pytest.raises(RunFailed, match=f"diverged at step 5: {expected}"):
        trainer.train()
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]  # no checkpoint of a poisoned state
    last = tmp_path / "checkpoints" / "checkpoint-4"
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 4
    saved = load_file(last / "adapter_model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.slow
def test_a_killed_data_parallel_rank_never_leaves_running_and_resume_gives_the_same_adapter(tmp_path):
    """Two gloo processes; rank 1 is SIGKILLed after step 5. The launcher ends the job; run.json
    must then read failed (rank 0 saw its peer go) or stale (rank 0 was killed before it could
    say), never running; --resume on two processes gives the uninterrupted run's adapter."""
    from tests.training.test_distributed import free_port
    from workbench.formats.run_record import read_run, run_state

    def launch(out, *extra, module="workbench", kill=None):
        env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled",
               "OMP_NUM_THREADS": "1", "KILL_RANK": "1", "KILL_STEP": str(kill)}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", module, "train", RECIPE, "--output-dir", str(out),
               *COMMON, "train.batch_size=4", *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=repo("."))

    clean = launch(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    out = tmp_path / "killed"
    killed = launch(out, module="tests.kill_rank", kill=5)
    assert killed.returncode != 0
    record = read_run(out)
    state = run_state(record, out)
    assert state in ("failed", "interrupted", "stale"), state
    if state == "failed":
        assert "a data-parallel process is gone" in record.reason
        assert "failed: a data-parallel process is gone" in killed.stderr and "--resume" in killed.stderr
    assert latest_checkpoint(out).name == "checkpoint-4"
    resumed = launch(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_run(out).status == "completed"
    assert_adapters_match(adapter(tmp_path / "clean"), adapter(out), rtol=1e-5, atol=1e-7, norm_tol=1e-6,
                          min_close=1.0)
