"""`workbench reduce-intruders`: PEFT's intruder-dimension reduction applied to a run's adapter,
written as a new run whose adapter loads in plain PEFT as what PEFT's function made in memory."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from tests.helpers import repo
from workbench.cli import main
from workbench.config.recipe import load_recipe
from workbench.modeling.tiny import tiny_model, tiny_tokenizer

SHORT = ["train.max_steps=12", "train.eval_steps=null", "train.learning_rate=2e-2", "data.max_examples=64"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from workbench.training.run import train

    return train(load_recipe(repo("recipes/tiny.yaml"), SHORT), tmp_path_factory.mktemp("intruders") / "run")


def _delta(adapter_dir) -> dict[str, torch.Tensor]:
    """Each layer's weight change, from the adapter loaded in plain PEFT on a fresh base."""
    peft_model = PeftModel.from_pretrained(tiny_model(len(tiny_tokenizer())), str(adapter_dir))
    return {name: module.get_delta_weight("default").detach().clone()
            for name, module in peft_model.named_modules() if hasattr(module, "get_delta_weight")
            and "default" in getattr(module, "lora_A", {})}


def test_the_written_adapter_is_peft_s_reduction_and_loads_in_plain_peft(run, tmp_path, capsys):
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    out = tmp_path / "reduced"
    # epsilon 1: every examined singular vector counts as an intruder, so every layer changes
    assert main(["reduce-intruders", str(run), "--out", str(out), "--epsilon", "1.0", "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "run.json").read_text())
    counts = record["intruders_reduced"]
    assert counts["layers_with_intruders"] == counts["layers"] == 14 and counts["intruder_dimensions"] == 28
    assert f"{counts['layers_with_intruders']} of {counts['layers']} layers had intruders" in printed
    assert record["recipe"]["name"] == "tiny_intruders" and record["recipe"]["family"] is None

    # the same reduction in memory, through PEFT's function on the same adapter
    peft_model = PeftModel.from_pretrained(tiny_model(len(tiny_tokenizer())), str(run / "adapter"))
    reduce_intruder_dimension(peft_model, "default", "reduced", top_k=2, threshold_epsilon=1.0,
                              mitigation_lambda=0.75, logging_sink=None)
    expected = {name: module.get_delta_weight("reduced") for name, module in peft_model.named_modules()
                if hasattr(module, "get_delta_weight") and "reduced" in getattr(module, "lora_A", {})}
    written, original = _delta(out / "adapter"), _delta(run / "adapter")
    assert written.keys() == expected.keys() == original.keys()
    for name in expected:
        assert torch.allclose(written[name], expected[name], atol=1e-6), name
    # negative control: the reduction changed the adapter, by more than the tolerance above
    assert max(float((written[n] - original[n]).abs().max()) for n in written) > 1e-3


def test_bad_settings_and_an_existing_output_are_one_line(run, tmp_path, capsys):
    assert main(["reduce-intruders", str(run), "--out", str(tmp_path / "x"), "--epsilon", "0"]) == 2
    assert "expected top-k >= 1, epsilon in (0, 1] and lambda in [0, 1]" in capsys.readouterr().err
    assert main(["reduce-intruders", str(run), "--out", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
