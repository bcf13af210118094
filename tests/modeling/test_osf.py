"""`lora.method: osf`: PEFT's OSF with r trainable singular directions per target, starting at the
base, trained through PEFT's projection hooks, saved as an adapter plain PEFT loads; what assumes
LoRA's factors is refused or computed through PEFT's own delta."""

import pytest
import torch
from peft import PeftModel
from peft.tuners.osf import OSFLayer

from tests.helpers import make_batch, repo
from workbench.config.recipe import LoraSection, load_recipe
from workbench.errors import UsageError
from workbench.evals.evaluate import _check_loaded
from workbench.modeling.load import apply_lora, load_model, load_tokenizer, model_fingerprint
from workbench.modeling.lora import adapter_scale, scaled_delta_norm
from workbench.modeling.tiny import tiny_model
from workbench.training.run import build_trainer

BATCH = make_batch(batch=4, seq=16)


def base():
    return tiny_model(vocab_size=259, hidden_size=32, intermediate_size=48, seed=0)


def logits(model):
    with torch.no_grad():
        return model(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits


def osf(**section):
    return apply_lora(base(), LoraSection(method="osf", **{"r": 4, **section}), 0.0)


def test_osf_trains_r_singular_directions_per_target_and_starts_at_the_base():
    reference = logits(base())
    model = osf()
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "OSF"
    layers = {n: m for n, m in model.named_modules() if isinstance(m, OSFLayer)}
    assert len(layers) == 2 * 7  # every linear layer of both decoder layers, not the head
    expected = 0
    for layer in layers.values():
        out, inp = layer.base_layer.weight.shape
        params = layer.osf_svd_params["default"]
        assert (params["U_low"].shape, params["S_low"].shape, params["V_low"].shape) == ((out, 4), (4,), (4, inp))
        expected += 4 * (out + inp) + 4  # LoRA's r (out + in), plus the r singular values
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    torch.testing.assert_close(logits(model), reference, rtol=0, atol=1e-5)
    assert scaled_delta_norm(model) < 1e-5


def test_osf_follows_target_modules_and_layers():
    model = osf(r=2, target_modules="attention", layers="1-1")
    names = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, OSFLayer))
    assert names == [f"model.layers.1.self_attn.{p}_proj" for p in "koqv"]


def test_osf_refuses_r_at_a_targets_rank():
    with pytest.raises(UsageError, match=r"lora.r 16 with lora.method osf: model.layers.0.self_attn.k_proj is "
                                         r"16x32, so at most 15 of its singular directions can train"):
        osf(r=16)


def test_osf_adapter_scales_other_than_1_are_refused():
    model = osf()
    with adapter_scale(model, 1.0):
        pass
    with pytest.raises(UsageError, match="adapter scale 0.5: a OSF adapter has no scale alpha / r"):
        with adapter_scale(model, 0.5):
            pass


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """The tiny recipe trained 4 steps under OSF, its trainer and run directory. Plain SGD: its step is
    the (projected) gradient, where Adam's per-element scaling would turn it out of the subspace."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(repo("recipes/tiny.yaml"), ["lora.method=osf", "train.max_steps=4", "train.eval_steps=null",
                                                     "train.optimizer=sgd", "train.learning_rate=0.5"])
    trainer, _ = build_trainer(recipe, tmp_path / "run")
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    trainer.save_model(str(tmp_path / "run" / "adapter"))
    return recipe, trainer, start, tmp_path / "run" / "adapter"


def test_osf_trains_through_pefts_projection_and_only_its_own_parameters(trained):
    recipe, trainer, start, _ = trained
    model = trainer.model
    for name, param in model.named_parameters():
        moved = not torch.equal(param.detach(), start[name])
        assert moved == ("osf_svd_params" in name), name
    # PEFT's hooks keep U_low's change orthogonal to the frozen top singular directions of W
    layer = model.get_submodule("base_model.model.model.layers.0.mlp.gate_proj")
    weight = layer.base_layer.weight.detach()
    U, _, _ = torch.linalg.svd(weight, full_matrices=False)
    high = U[:, :min(weight.shape) - recipe.lora.r]
    change = layer.osf_svd_params["default"]["U_low"].detach() - layer._osf_U_low_init["default"]
    assert change.norm() > 1e-3
    assert (high.T @ change).norm() < 1e-4 * change.norm()
    delta = layer.get_delta_weight("default").detach()
    assert scaled_delta_norm(model) >= delta.norm().item() > 0


def test_osf_adapter_loads_in_plain_peft_and_reproduces_the_trained_logits(trained):
    recipe, trainer, _, adapter = trained
    model = trainer.model.eval()
    batch = {k: v.to(model.device) for k, v in BATCH.items() if k != "labels"}
    batch["input_ids"] = batch["input_ids"] % 64
    with torch.no_grad():
        tuned = model(**batch).logits.cpu()
    fresh, _ = load_model(recipe.model, load_tokenizer(recipe.model))
    fingerprint = model_fingerprint(fresh)
    assert fingerprint == model_fingerprint(model)  # the adapter's own parameters are not the base
    with torch.no_grad():
        plain = fresh(**batch).logits
    loaded = PeftModel.from_pretrained(fresh, str(adapter)).eval()
    _check_loaded(loaded, "default", adapter)  # the evals' check counts OSF modules
    with torch.no_grad():
        again = loaded(**batch).logits
    assert (tuned - plain).abs().max() > 1e-2  # training moved it: the comparison below can fail
    torch.testing.assert_close(again, tuned, rtol=0, atol=1e-5)


def test_adapters_of_two_methods_are_refused_in_one_line_before_peft_stops(tmp_path):
    """PEFT cannot hold LoRA and OSF adapters on one model (its ValueError, with a traceback)."""
    from workbench.modeling.lora import check_one_method

    apply_lora(base(), LoraSection(r=4), 0.0).save_pretrained(str(tmp_path / "lora"))
    osf().save_pretrained(str(tmp_path / "osf"))
    check_one_method([tmp_path / "osf", tmp_path / "osf"])
    with pytest.raises(UsageError, match=r"lora is LORA, .*osf is OSF: PEFT holds adapters of one method"):
        check_one_method([tmp_path / "lora", tmp_path / "osf"])
