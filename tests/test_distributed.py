"""Two real data-parallel processes (gloo DDP on CPU) agree with one process on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import assert_adapters_match

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


@pytest.mark.parametrize("reference", ["model", "topk_cache"])
def test_two_processes_train_the_same_adapter_as_one(tmp_path, reference):
    """KL-to-base and EWC on; 2 x 4 examples per step vs 1 x 8, same seed, dropout 0. With the
    top-k cache (k above the vocabulary: the exact KL) the ranks build it together."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    common = [*COMMON, f"regularizers.kl_to_base.reference={reference}", "regularizers.kl_to_base.top_k=512"]
    workbench(["train", RECIPE, "--output-dir", str(one), "train.batch_size=8", *common], 1, tmp_path)
    workbench(["train", RECIPE, "--output-dir", str(two), "train.batch_size=4", *common], 2, tmp_path)
    run = json.loads((two / "run.json").read_text())
    assert run["world_size"] == 2 and run["status"] == "completed"
    assert (run["reference_cache"] is not None) == (reference == "topk_cache")
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


def test_two_processes_evaluate_as_one(tmp_path):
    """`accelerate launch -m workbench eval`: each rank scores a share of every component's items
    (general text, multiple choice, target loss and generation), rank 0 writes; the metrics equal
    one process's, and a second eval finds the base side cached without any rank recomputing it."""
    run = tmp_path / "run"
    workbench(["train", "recipes/tiny.yaml", "--output-dir", str(run), "train.max_steps=6", "train.eval_steps=null",
               "data.max_examples=48"], 1, tmp_path)
    suite = yaml.safe_load(open("evals/tiny.yaml"))
    suite["multiple_choice"] = [{"local": str(Path("evals/tasks/capitals.yaml").resolve())}]
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    results = {}
    for processes in (1, 2, 2):
        out = tmp_path / f"results{processes}.json"
        done = workbench(["eval", "--suite", str(tmp_path / "suite.yaml"), "--run", str(run), "--out", str(out)],
                         processes, tmp_path)
        assert done.stdout.count("results:") == 1  # the summary is printed once
        results.setdefault(processes, []).append(json.loads(out.read_text()))
    one, two = results[1][0], results[2][0]
    assert two["base"]["cache"]["misses"] and two["base"]["forward_calls"]["base"] > 0
    for side in ("base", "tuned"):  # rank 0 ran about half the forward passes: the work was shared
        assert two["base"]["forward_calls"][side] < 0.75 * one["base"]["forward_calls"][side]
    assert results[2][1]["base"]["forward_calls"]["base"] == 0 and not results[2][1]["base"]["cache"]["misses"]
    assert [e["name"] for e in one["entries"]] == [e["name"] for e in two["entries"]]
    for a, b in zip(one["entries"], two["entries"]):
        assert a["metrics"].keys() == b["metrics"].keys() and any(k.startswith("retention.mc.") for k in a["metrics"])
        for name in a["metrics"]:
            assert b["metrics"][name]["value"] == pytest.approx(a["metrics"][name]["value"], rel=1e-4, abs=1e-6), name


def test_kl_to_base_under_fsdp2_sharding(tmp_path):
    """Under FSDP 2 the LM head is sharded outside the root forward; the reference must still equal
    the unsharded KL (accelerate runs FSDP only on GPUs, so fully_shard is applied directly)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "tests/fsdp_kl_worker.py"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["expected"] > 1e-4 and result["gradient_reached"] and result["head_sharded"]
    assert result["value"] == pytest.approx(result["expected"], rel=1e-5)
    assert result["resharded"] == pytest.approx(result["expected"], rel=1e-5)
