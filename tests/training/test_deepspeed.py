"""DeepSpeed ZeRO-2 and ZeRO-3 over 2 CPU processes (DeepSpeed's CPU accelerator over gloo),
launched with the shipped configs in recipes/accelerate/ in fp32, train the 1-process adapter with
KL-to-base, EWC and the delta L2 on. 8 to 14 minutes on 2 busy cores (each launch starts DeepSpeed;
the first on a machine also compiles its shared-memory all-reduce op, about 2 minutes)."""

import json
from importlib.util import find_spec

import pytest
from safetensors.torch import load_file

from tests.helpers import assert_adapters_equal, assert_loss_is_the_sum_of_terms, assert_terms_equal, logged_terms, repo
from tests.training.test_distributed import COMMON, EXACT, RECIPE, SGD, TERMS_EXACT, workbench

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(find_spec("deepspeed") is None, reason="deepspeed is not installed (extra: deepspeed)")]

CONFIGS = {2: repo("recipes/accelerate/deepspeed_zero2.yaml"), 3: repo("recipes/accelerate/deepspeed_zero3.yaml")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trained(stage, *overrides, mutant=None) -> (adapter, run.json, the finished process):
    tiny_all under COMMON and SGD with a global batch of 8, in 1 process (stage None) or under
    ZeRO-`stage` in 2 (4 each); each distinct run is launched once per module."""
    root, done = tmp_path_factory.mktemp("deepspeed"), {}

    def run(stage, *overrides, mutant=None):
        key = (stage, overrides, mutant)
        if key not in done:
            out, processes = root / f"run{len(done)}", 1 if stage is None else 2
            finished = workbench(["train", RECIPE, "--output-dir", str(out), f"train.batch_size={8 // processes}",
                                  *COMMON, *SGD, *overrides], processes, root, mutant,
                                 config=CONFIGS.get(stage), check=mutant is None)
            adapter = out / "adapter" / "adapter_model.safetensors"
            done[key] = (load_file(adapter) if adapter.is_file() else None,
                         json.loads((out / "run.json").read_text()), finished)
        return done[key]
    return run


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_the_same_adapter_as_one_process(trained, stage):
    """Optimiser states and gradients (ZeRO-2), and the parameters too (ZeRO-3), sharded over 2
    ranks: the adapter and every logged term equal one process's (measured 2.3e-7 and 2.7e-7 of
    the adapter's scale), as under DDP."""
    (one, single, _), (two, run, _) = trained(None), trained(stage)
    assert run["world_size"] == 2 and run["status"] == "completed"
    assert all(logged_terms(run)[-1][name] > 0 for name in ("kl_to_base", "ewc", "delta_l2"))
    assert_adapters_equal(one, two, EXACT)
    assert_terms_equal(single, run, TERMS_EXACT)
    assert_loss_is_the_sum_of_terms(run)


def test_the_zero_comparison_catches_a_misweighted_penalty(trained):
    """Negative control: the KL weighted 1.1x under ZeRO-3 is outside the tolerance."""
    with pytest.raises(AssertionError):
        assert_adapters_equal(trained(None)[0], trained(3, "regularizers.kl_to_base.weight=0.55")[0], EXACT)


def test_zero3_partitions_the_lora_factors_that_parameter_penalties_gather(trained):
    """Negative control: ZeRO-3 leaves each LoRA factor partitioned outside its module's forward,
    so EWC without `distributed.gathered` reads shards and the run fails, in one line from each
    rank that gets there before the launcher stops the other (which also shows the parameters
    really are partitioned in the runs above)."""
    adapter, run, finished = trained(3, mutant="ungathered")
    assert finished.returncode != 0 and adapter is None and run["status"] == "failed"
    lines = [line for line in finished.stderr.splitlines() if line.startswith("failed: ")]
    assert 1 <= len(lines) <= 2 and all("RuntimeError: stack expects" in line for line in lines)
