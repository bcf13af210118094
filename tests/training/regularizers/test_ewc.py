import torch

from tests.helpers import make_peft
from workbench.training.regularizers.delta_l2 import DeltaL2
from workbench.training.regularizers.ewc import EWC, EWCConfig
from workbench.training.regularizers.base import PenaltyConfig
from workbench.modeling.lora import adapter_scale, lora_factors


def dense_deltas(model):
    return {f.key: f.scale * (f.B @ f.A) for f in lora_factors(model)}


def random_fisher(model, estimator, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fisher = {}
    for f in lora_factors(model):
        out_f, in_f = f.B.shape[0], f.A.shape[1]
        if estimator == "diag":
            fisher[f"{f.key}.diag"] = torch.rand(out_f, in_f, generator=gen)
        else:
            fisher[f"{f.key}.g"] = torch.rand(out_f, generator=gen)
            fisher[f"{f.key}.a"] = torch.rand(in_f, generator=gen)
    return fisher


def ewc_value(model, fisher):
    return EWC(EWCConfig(weight=1.0, fisher="unused"), fisher=fisher).term(model, {}, None)


def assert_value_and_gradient_match(model, ours, expected):
    """Same value, and the same gradient on every LoRA factor (modules are stacked by shape). The
    r x r contraction sums in another order than the materialised delta: fp32 gradients agree to
    ~3e-5 relative."""
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-9)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_kfac_penalty_equals_brute_force_with_materialised_fisher():
    model = make_peft()
    assert len({(f.A.shape, f.B.shape) for f in lora_factors(model)}) > 1  # several stacks
    fisher = random_fisher(model, "kfac_diag")
    expected = sum(
        0.5 * (torch.outer(fisher[f"{k}.g"], fisher[f"{k}.a"]) * dW**2).sum()
        for k, dW in dense_deltas(model).items())
    assert_value_and_gradient_match(model, ewc_value(model, fisher), expected)


def test_diag_penalty_equals_brute_force():
    model = make_peft()
    fisher = random_fisher(model, "diag")
    expected = sum(0.5 * (fisher[f"{k}.diag"] * dW**2).sum() for k, dW in dense_deltas(model).items())
    assert_value_and_gradient_match(model, ewc_value(model, fisher), expected)


def test_ewc_is_zero_at_the_base_and_quadratic_in_the_delta():
    model = make_peft(perturb=False)
    fisher = random_fisher(model, "kfac_diag")
    assert ewc_value(model, fisher).item() == 0.0
    model = make_peft(perturb=True)
    full = ewc_value(model, fisher)
    with adapter_scale(model, 0.5):
        torch.testing.assert_close(ewc_value(model, fisher), full / 4)


def test_ewc_gradient_reaches_both_factors():
    model = make_peft()
    ewc_value(model, random_fisher(model, "kfac_diag")).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_delta_l2_equals_squared_frobenius_norm_of_delta():
    model = make_peft()
    expected = sum((dW**2).sum() for dW in dense_deltas(model).values())
    value = DeltaL2(PenaltyConfig(weight=1.0)).term(model, {}, None)
    assert_value_and_gradient_match(model, value, expected)
    assert DeltaL2(PenaltyConfig(weight=1.0)).term(make_peft(perturb=False), {}, None).item() == 0.0
