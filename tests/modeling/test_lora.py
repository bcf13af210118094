import torch

from tests.helpers import make_batch, make_peft
from workbench.modeling.lora import adapter_scale, as_base


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_as_base_scores_the_base_in_eval_mode_without_grad_and_restores():
    model = make_peft(perturb=True)
    model.train()
    batch = make_batch()
    with adapter_scale(model, 0.0), torch.no_grad():
        expected = _logits(model, batch)  # the delta at scale 0: exactly the base
    with as_base(model) as peft_model:
        assert peft_model is model and not model.training
        base = _logits(model, batch)
        assert not base.requires_grad
    torch.testing.assert_close(base, expected, rtol=0, atol=0)
    assert model.training  # restored
    assert not torch.equal(_logits(model.eval(), batch), base)  # the adapter is back on


def test_as_base_with_grad_keeps_autograd_for_the_fisher():
    """The base weights are frozen, so the Fisher asks for gradients from the embeddings on: grad
    mode must stay on inside (it is off without grad=True)."""
    model = make_peft(perturb=True)
    with as_base(model, grad=True):
        assert torch.is_grad_enabled() and not model.training  # eval mode: no dropout in the Fisher
    with as_base(model):
        assert not torch.is_grad_enabled()


def test_as_base_restores_the_mode_when_the_block_raises():
    model = make_peft()
    model.train()
    try:
        with as_base(model):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert model.training
    with torch.no_grad():
        on = _logits(model, make_batch())
    with as_base(model):
        off = _logits(model, make_batch())
    assert not torch.equal(on, off)  # the adapter was re-enabled after the error
