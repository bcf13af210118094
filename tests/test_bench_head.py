"""scripts/bench.py --head smoke: the fused head's benchmark runs end to end on a tiny random model
and writes the rows it promises. One round on a tiny model measures no speed; what is checked is
that each row is what it says it is, and one fact that holds at any size: our trainer on today's
full-logits path, with no penalty, holds exactly the memory a plain HF Trainer + PEFT step holds."""

import json
import subprocess
import sys

import pytest
from tests.helpers import REPO as ROOT

PEAKS_32 = ["fused_vs_hf"]
PEAKS_64 = ["fused_vs_hf", "kl_vs_hf", "ewc_vs_hf", "kl_vs_fused", "kl_full_vs_full", "full_vs_hf", "kl_full_vs_hf"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_head") / "head.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--head", "smoke", "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| figure | compared |" in result.stdout
    return {r["name"]: r for r in json.loads(out.read_text())}


def test_every_pair_has_a_memory_row_and_the_timed_length_a_time_row(rows):
    label = "tiny"
    expected = [f"head_peak_{p}_{label}_T32" for p in PEAKS_32] + [f"head_peak_{p}_{label}_T64" for p in PEAKS_64]
    expected += [f"head_time_{p}_{label}_T64" for p in PEAKS_64] + [f"head_eval_peak_{label}_T64"]
    assert sorted(rows) == sorted(expected)


def test_each_ratio_is_ours_over_the_baseline(rows):
    for name, r in rows.items():
        assert r["a"] > 0 and r["b"] > 0, name
        if r["unit"] == "MB":
            # a and b are rounded to 0.1 MB: ratio * a is b up to that rounding on both
            assert abs(r["ratio"] * r["a"] - r["b"]) <= 0.05 * (1 + r["ratio"]) + 1e-9, name
        assert r["met"] is None if r["target"] is None else r["met"] == (r["ratio"] <= float(r["target"].split()[1]))


def test_the_full_logits_path_without_a_penalty_holds_what_hf_holds(rows):
    # the baseline side of every memory row is one measured HF step per length
    assert rows["head_peak_full_vs_hf_tiny_T64"]["a"] == rows["head_peak_fused_vs_hf_tiny_T64"]["a"]
    assert rows["head_peak_full_vs_hf_tiny_T64"]["ratio"] == pytest.approx(1.0, abs=0.02)


def test_every_preset_names_a_model_it_can_build_and_full_tensors_count_every_row(rows):
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_head import HEAD_PRESETS
    from workbench.assets.models import NAMED

    for name, preset in HEAD_PRESETS.items():
        assert all(m in NAMED or m in ("llama-1b", "tiny-random-llama") for m in preset.models), name
    assert HEAD_PRESETS["cpu-gemma3"].seqs == (64, 384) and HEAD_PRESETS["cpu-gemma3-4k"].seqs == (4096,)
    assert not HEAD_PRESETS["cpu-gemma3-4k"].full_path  # its KL on full logits: ~5 x 4 GiB
    assert HEAD_PRESETS["cpu-gemma3-batch"].batch == 16
    row = rows["head_peak_fused_vs_hf_tiny_T64"]  # batch 1: one [T, V] fp32 tensor, V = 259
    assert row["batch"] == 1 and row["full_tensor_mb"] == round(64 * 259 * 4 / 2**20, 1)
