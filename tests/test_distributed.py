"""Two real data-parallel processes (gloo DDP on CPU) agree with one process on the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import assert_adapters_match

RECIPE = "recipes/tiny_all.yaml"
COMMON = ["train.max_steps=4", "data.max_examples=64", "data.val_fraction=0", "train.eval_steps=null",
          "regularizers.lora_dropout=0", "regularizers.kl_to_base.warmup_steps=0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def workbench(args, processes, tmp_path):
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / f"cache{processes}"),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", "workbench"]
    cmd = launcher if processes > 1 else [sys.executable, "-m", "workbench"]
    done = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_train_the_same_adapter_as_one(tmp_path):
    """KL-to-base and EWC on; 2 x 4 examples per step vs 1 x 8, same seed, dropout 0."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    workbench(["train", RECIPE, "--output-dir", str(one), "train.batch_size=8", *COMMON], 1, tmp_path)
    workbench(["train", RECIPE, "--output-dir", str(two), "train.batch_size=4", *COMMON], 2, tmp_path)
    run = json.loads((two / "run.json").read_text())
    assert run["world_size"] == 2 and run["status"] == "completed"
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    assert_adapters_match(a, b, rtol=1e-5, atol=1e-6, norm_tol=1e-4)
    steps = [h for h in run["history"] if "ewc" in h]
    assert len(steps) == 4 and steps[-1]["kl_to_base"] > 0


def test_fisher_from_two_processes_equals_one_process(tmp_path):
    paths = {}
    for processes in (1, 2):
        paths[processes] = tmp_path / f"fisher{processes}.safetensors"
        workbench(["fisher", RECIPE, "--out", str(paths[processes]), "regularizers.ewc.num_examples=10"],
                  processes, tmp_path)
    one, two = load_file(paths[1]), load_file(paths[2])
    assert one.keys() == two.keys() and len(one) > 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-12)
    with safe_open(str(paths[2]), "pt") as handle:
        assert handle.metadata()["num_examples"] == "10"
        assert handle.metadata()["world_size"] == "2"  # each rank estimated on half and all-reduced


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("recipes/accelerate/*.yaml")))
def test_launch_configs_load_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(path)
    assert config.num_processes >= 2 and config.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")
