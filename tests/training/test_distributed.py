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

from tests.helpers import (REPO, repo, assert_adapters_equal, assert_loss_is_the_sum_of_terms, assert_terms_equal,
                            logged_terms)

RECIPE = repo("recipes/tiny_all.yaml")
# tiny_all: KL-to-base, EWC, delta L2, label smoothing 0.1 and weight decay on; dropout off
COMMON = ["train.max_steps=4", "data.max_examples=64", "data.val_fraction=0", "train.eval_steps=null",
          "regularizers.lora_dropout=0", "regularizers.kl_to_base.warmup_steps=0"]
# plain SGD: float rounding stays rounding (see tests/test_run.py for the learning rate)
SGD = ["train.optimizer=sgd", "train.learning_rate=0.1"]
EXACT = 1e-6  # 2 processes vs 1 measured 1.9e-7 to 5.0e-7 of the adapter's scale over train.seed 0-4
TERMS_EXACT = 1e-5  # logged terms: measured up to 7.7e-7 of each term's scale (the KL) over seeds 0-4
# AdamW (the recipe's lr 5e-3) turns rounding in a near-zero gradient into up to a whole step: with
# the top-k cache, 2 processes vs 1 measured 2.4e-5 to 9.1e-4 (seed 0) over train.seed 0-4; 5x that
ADAM_NOISE = 5e-3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def workbench(args, processes, tmp_path, mutant=None, config=None, check=True):
    """`workbench ARGS` in 1 process, or under `accelerate launch` in several (DDP, or the launch
    config file `config`, in fp32); mutant: run tests/mutants.py instead, with that deliberate bug
    in the trainer; check: assert it succeeded."""
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / f"cache{processes}"), "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "WORKBENCH_MUTANT": mutant or ""}
    module = "tests.mutants" if mutant else "workbench"
    launcher = [sys.executable, "-m", "accelerate.commands.launch",
                *(["--config_file", config] if config else ["--multi_gpu"]), "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", module]
    cmd = launcher if processes > 1 else [sys.executable, "-m", module]
    done = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trained(processes, *overrides, mutant=None) -> (adapter, run.json): tiny_all under COMMON
    with a global batch of 8 (8 // processes per process); each distinct run is launched once per
    module and shared by the tests below."""
    root, done = tmp_path_factory.mktemp("ddp"), {}

    def run(processes, *overrides, mutant=None):
        key = (processes, overrides, mutant)
        if key not in done:
            out = root / f"run{len(done)}"
            workbench(["train", RECIPE, "--output-dir", str(out), f"train.batch_size={8 // processes}", *COMMON,
                       *overrides], processes, root, mutant)
            done[key] = (load_file(out / "adapter" / "adapter_model.safetensors"),
                         json.loads((out / "run.json").read_text()))
        return done[key]
    return run


def test_two_processes_train_the_same_adapter_as_one(trained):
    """KL-to-base, EWC, delta L2 and label smoothing on; under SGD, 2 x 4 examples per step give
    1 x 8's adapter to float rounding, same seed, dropout 0."""
    (one, _), (two, run) = trained(1, *SGD), trained(2, *SGD)
    assert run["world_size"] == 2 and run["status"] == "completed" and run["reference_cache"] is None
    steps = logged_terms(run)
    assert len(steps) == 4 and all(steps[-1][name] > 0 for name in ("kl_to_base", "ewc", "delta_l2"))
    assert_adapters_equal(one, two, EXACT)


@pytest.mark.parametrize("overrides, mutant", [(("regularizers.kl_to_base.weight=0.55",), None),
                                               ((), "per_micro_batch")])
def test_the_two_process_comparison_catches_a_misnormalised_penalty(trained, overrides, mutant):
    """Negative controls, in the 2-process run only: the KL weighted 1.1x (measured 1.2e-2 of the
    adapter's scale), or the KL as a mean per micro-batch and rank, not renormalised by the
    all-rank token count (9.5e-4); correct: 2.3e-7."""
    with pytest.raises(AssertionError):
        assert_adapters_equal(trained(1, *SGD)[0], trained(2, *SGD, *overrides, mutant=mutant)[0], EXACT)


def test_two_processes_log_the_same_terms_as_one(trained):
    """run.json's task_loss, each penalty and weighted penalty, per step, are the mean over ranks
    (of each rank's share of the all-rank batch), so they equal one process's, and loss =
    task_loss + the weighted penalties as in one process."""
    (_, one), (_, two) = trained(1, *SGD), trained(2, *SGD)
    assert_terms_equal(one, two, TERMS_EXACT)
    assert_loss_is_the_sum_of_terms(two)


def test_without_the_mean_over_ranks_rank_0_logs_only_its_own_share(trained):
    """Negative control: log() not reducing over ranks. The update is the same (logging does not
    train) and so are the parameter penalties (every rank holds the same adapter), but each
    per-token term is rank 0's share of the batch: measured 8.9% of its scale off one process's
    (task_loss and the KL), and loss is no longer their sum."""
    (_, single), (two, _) = trained(1, *SGD), trained(2, *SGD)
    local, run = trained(2, *SGD, mutant="rank_local_log")
    assert_adapters_equal(two, local, EXACT)
    assert_terms_equal(single, run, TERMS_EXACT, names=["ewc", "ewc_weighted", "delta_l2", "delta_l2_weighted"])
    for name in ("task_loss", "kl_to_base", "kl_to_base_weighted"):
        with pytest.raises(AssertionError):
            assert_terms_equal(single, run, TERMS_EXACT, names=[name])
    with pytest.raises(AssertionError):
        assert_loss_is_the_sum_of_terms(run)


def test_two_processes_under_adamw_with_the_topk_cache_stay_within_measured_noise(trained):
    """The recipe's optimizer, and the KL against the top-k cache that the ranks build together
    (k above the vocabulary: the exact KL): the same adapter up to ADAM_NOISE."""
    topk = ["regularizers.kl_to_base.reference=topk_cache", "regularizers.kl_to_base.top_k=512"]
    (one, _), (two, run) = trained(1, *topk), trained(2, *topk)
    assert run["reference_cache"] is not None and run["world_size"] == 2
    assert_adapters_equal(one, two, ADAM_NOISE)


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


@pytest.mark.parametrize("path", sorted(__import__("glob").glob(repo("recipes/accelerate/*.yaml"))))
def test_launch_configs_load_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(path)
    assert config.num_processes >= 2 and config.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")


def test_two_processes_evaluate_as_one(tmp_path):
    """`accelerate launch -m workbench eval`: each rank scores a share of every component's items
    (general text, multiple choice, target loss and generation), rank 0 writes; the metrics equal
    one process's, and a second eval finds the base side cached without any rank recomputing it."""
    run = tmp_path / "run"
    workbench(["train", repo("recipes/tiny.yaml"), "--output-dir", str(run), "train.max_steps=6", "train.eval_steps=null",
               "data.max_examples=48"], 1, tmp_path)
    suite = yaml.safe_load(open(repo("evals/tiny.yaml")))
    suite["multiple_choice"] = [{"local": str(Path(repo("evals/tasks/capitals.yaml")).resolve())}]
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
                           "--master_port", str(free_port()), repo("tests/fsdp_kl_worker.py")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["expected"] > 1e-4 and result["gradient_reached"] and result["head_sharded"]
    assert result["value"] == pytest.approx(result["expected"], rel=1e-5)
    assert result["resharded"] == pytest.approx(result["expected"], rel=1e-5)


# the retention probe every 2 steps on 32-token chunks, with the KL penalty off so that the
# training-batch KL is the probe's own base forward
PROBE = ["train.retention_probe.every=2", "train.retention_probe.chunk_length=32", "regularizers.kl_to_base=null"]


def test_two_processes_probe_as_one(trained):
    """The probe shares its chunks out over the ranks and gathers them back, and the training-batch
    KL is reduced like every term: 2 processes log 1 process's values (the adapters agree to EXACT,
    so the values differ by rounding). Negative control: the probe's KL moved by 1e-4 of itself
    is caught by the tolerance."""
    (one_adapter, one), (two_adapter, two) = trained(1, *SGD, *PROBE), trained(2, *SGD, *PROBE)
    assert_adapters_equal(one_adapter, two_adapter, EXACT)
    keys = ("retention_ppl_ratio", "retention_kl", "retention_kl_upper", "retention_train_kl")
    probed = [{"step": h["step"], **{k: h[k] for k in keys if k in h}} for h in one["history"]
              if any(k in h for k in keys)]
    assert [p["step"] for p in probed if "retention_kl" in p] == [2, 4]
    assert [p["step"] for p in probed if "retention_train_kl" in p] == [1, 2, 3, 4]
    other = [{"step": h["step"], **{k: h[k] for k in keys if k in h}} for h in two["history"]
             if any(k in h for k in keys)]
    assert [p.keys() for p in other] == [p.keys() for p in probed]
    for a, b in zip(probed, other):
        for key in set(a) - {"step"}:
            assert b[key] == pytest.approx(a[key], rel=TERMS_EXACT), (a["step"], key)
            if a[key] > 1e-6:  # at step 1 the adapter is still the base: KL 0
                assert b[key] * (1 + 1e-4) != pytest.approx(a[key], rel=TERMS_EXACT)
