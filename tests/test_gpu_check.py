"""scripts/gpu_check.sh, the device checks: its CPU smoke mode runs every part at toy size and
writes what it promises (slow: several minutes on 2 shared cores), the adapter check fails on
an untrained adapter and on a run that was not FSDP, and the MFU's parameter count and peak are
the documented ones."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
PARTS = ["a_qlora_train", "a_qlora_eval", "a_qlora_adapter", "b_throughput", "c_fsdp_train", "c_fsdp_adapter",
         "d_evals"]


@pytest.fixture(scope="module")
def gpu_check():
    """scripts/gpu_check.py as a module."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_the_script_parses_and_refuses_an_unknown_argument_in_one_line():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    done = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_the_mfu_counts_the_weights_that_multiply_and_the_device_peak(gpu_check):
    """N: every parameter less the input embedding, which a tied head multiplies after all; the
    1B shape is about 1.24B (Llama 3.2 1B's count); peaks by device name, PCIe before SXM."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    def count(shape):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**shape))
        return gpu_check.matmul_weights(model), sum(p.numel() for p in model.parameters())

    shape = gpu_check.LLAMA_1B
    n, total = count(shape)
    assert n == total and 1.2e9 < n < 1.3e9
    untied, untied_total = count({**shape, "tie_word_embeddings": False})
    assert untied == untied_total - shape["vocab_size"] * shape["hidden_size"] == n
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == gpu_check.peak_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_flops("NVIDIA A10G") is None and gpu_check.peak_flops(None) is None
    assert gpu_check.peak_flops(None, tflops=2.0) == 2e12


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("lm_eval")
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "WORKBENCH_CACHE": str(out / "cache"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], env=env, capture_output=True, text=True,
                          timeout=1500, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_cpu_smoke_run_writes_every_part(smoke):
    summary = [line.split()[:2] for line in (smoke / "summary.txt").read_text().splitlines()]
    assert summary == [[part, "ok"] for part in PARTS]
    assert json.loads((smoke / "a_qlora" / "results.json").read_text())["entries"]
    run = json.loads((smoke / "a_qlora" / "run.json").read_text())
    assert {"kl_to_base", "ewc"} <= set(run["penalties"]) and run["global_step"] == 10
    rows = json.loads((smoke / "b_throughput.json").read_text())
    assert [(r["model"], r["trainer"]) for r in rows] == [
        (model, trainer) for model in ("tiny-random-llama", "llama-toy-random")
        for trainer in ("hf_trainer_peft", "ours_no_penalty", "ours_kl_to_base")]
    for r in rows:  # the smoke run passes a nominal peak of 1 TFLOP/s
        assert r["tokens_per_s"] > 0 and r["tokens_per_step"] > 0
        assert r["mfu"] == pytest.approx(6 * r["matmul_weights"] * r["tokens_per_s"] / 1e12, rel=1e-3)
    evals = json.loads((smoke / "d_evals.json").read_text())
    assert {r["name"] for r in evals} >= {"mc_eval", "ppl_eval"} and all(r["identical_scores"] for r in evals)
    assert "loads in PEFT" in (smoke / "c_fsdp_adapter.log").read_text()


@pytest.mark.slow
def test_the_adapter_check_fails_on_an_untrained_adapter_and_on_a_run_without_fsdp(smoke, gpu_check, tmp_path,
                                                                                    capsys):
    """Negative controls of part a and c's check: the smoke run's adapter with every LoRA B zeroed,
    and the FSDP config's run on CPU, which accelerate ran as DDP (its checkpoint has optimizer.pt)."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "run"
    shutil.copytree(smoke / "a_qlora", copy, ignore=shutil.ignore_patterns("checkpoints"))
    weights = load_file(copy / "adapter" / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              copy / "adapter" / "adapter_model.safetensors")
    assert gpu_check.main(["adapter", str(smoke / "a_qlora")]) == 0
    assert gpu_check.main(["adapter", str(copy)]) == 1
    assert gpu_check.main(["adapter", str(smoke / "c_fsdp"), "--fsdp"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in errors if line.startswith("failed")] == ["failed", "failed"]
    assert any("every LoRA B is zero" in line for line in errors)
    assert any("without FSDP" in line for line in errors)
