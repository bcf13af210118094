"""`workbench average`: the weighted average of a run's adapters, exactly, as a run to evaluate."""

import pytest
import torch
from peft import PeftModel

from tests.helpers import repo
from workbench.cli import main
from workbench.config.recipe import load_recipe
from workbench.formats.run_record import read_run
from workbench.modeling.load import load_model, load_tokenizer
from workbench.modeling.lora import lora_factors
from workbench.training.run import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """recipes/tiny.yaml, 4 steps, a checkpoint every 2 (checkpoint-2, checkpoint-4)."""
    recipe = load_recipe(repo("recipes/tiny.yaml"), ["train.max_steps=4", "train.save_steps=2",
                                                     "data.max_examples=48", "train.eval_steps=null"])
    return train(recipe, tmp_path_factory.mktemp("avg") / "run")


def factors(adapter_dir) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """{module: (scale, B, A)} of an adapter loaded on the tiny base model, in float64."""
    recipe = load_recipe(repo("recipes/tiny.yaml"))
    model, _ = load_model(recipe.model, load_tokenizer(recipe.model))
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        return {f.key: (f.scale, f.B.double().clone(), f.A.double().clone()) for f in lora_factors(peft_model)}


def deltas(run_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """{module: scale * B @ A}."""
    return {key: s * B @ A for key, (s, B, A) in factors(adapter_dir).items()}


def test_the_average_is_the_weighted_sum_of_the_deltas(run, tmp_path):
    out = tmp_path / "avg"
    assert main(["average", str(run), "--steps", "final", "2", "--weights", "0.75", "0.25", "--out", str(out)]) == 0
    final, early = deltas(run, run / "adapter"), deltas(run, run / "checkpoints" / "checkpoint-2")
    averaged = deltas(run, out / "adapter")
    assert averaged.keys() == final.keys() and len(final) > 0
    for key in final:
        expected = 0.75 * final[key] + 0.25 * early[key]
        torch.testing.assert_close(averaged[key], expected, rtol=1e-5, atol=1e-7)
    # negative control: averaging B and A apart is not the average of the products, and the
    # tolerance above tells the two apart
    one, two = factors(run / "adapter"), factors(run / "checkpoints" / "checkpoint-2")
    naive = {key: one[key][0] * (0.75 * one[key][1] + 0.25 * two[key][1]) @ (0.75 * one[key][2] + 0.25 * two[key][2])
             for key in one}
    wrong = [key for key in final if not torch.allclose(naive[key], 0.75 * final[key] + 0.25 * early[key],
                                                         rtol=1e-5, atol=1e-7)]
    assert len(wrong) == len(final)
    record = read_run(out)
    assert record.recipe["name"] == "tiny_avg" and record.status == "completed"
    assert [a["step"] for a in record.averaged_from] == ["final", "2"]
    assert record.model_fingerprint == read_run(run).model_fingerprint


@pytest.mark.parametrize("args, message", [
    (["--steps", "final"], "name at least two adapters"),
    (["--steps", "final", "3"], "no adapter there (checkpoints saved at steps: 2, 4"),
    (["--steps", "final", "two"], "expected a checkpoint step or 'final'"),
    (["--steps", "final", "2", "--weights", "0.5"], "1 weights for 2 adapters"),
    (["--steps", "final", "2", "--weights", "0.7", "0.7"], "positive weights that sum to 1"),
])
def test_bad_input_is_one_line_exit_2(run, tmp_path, capsys, args, message):
    out = tmp_path / "avg"
    assert main(["average", str(run), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()
