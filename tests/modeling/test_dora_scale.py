"""Adapter scales of DoRA adapters: the scaled model equals a brute-force reconstruction of its
weights, scale 0 is the base, and a calibrated DoRA adapter written to disk loads in plain PEFT
as the same scaled model. Negative control: scaling `scaling` alone (the magnitude left trained)
misses the reconstruction by far more than the tolerance."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from workbench.calibrate import fold_scale
from workbench.modeling.lora import LoraLayer, adapter_scale, scaled_delta_norm, scaled_magnitudes
from workbench.modeling.tiny import tiny_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _dora(seed: int = 0) -> PeftModel:
    """A tiny Llama with a trained-looking DoRA adapter: B nonzero and the magnitude moved off
    the base's row norms (the two things training changes)."""
    model = tiny_model(vocab_size=259, hidden_size=32, intermediate_size=48, seed=seed)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=gen))
    return peft_model.eval()


def _reconstructed(peft_model: PeftModel, t: float) -> torch.nn.Module:
    """A plain copy of the base whose targeted weights are DoRA's at scale t, computed by hand:
    W_t = m_t * V / ||V|| per output row, V = W + t * s * B @ A, m_t = ||W|| + t * (m - ||W||)."""
    plain = tiny_model(vocab_size=259, hidden_size=32, intermediate_size=48, seed=0).eval()
    weights = dict(plain.named_parameters())
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            key = name.removeprefix("base_model.model.") + ".weight"
            W = module.get_base_layer().weight.double()
            A, B = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            m = module.lora_magnitude_vector["default"].weight.double()
            m_t = W.norm(dim=1) + t * (m - W.norm(dim=1))
            V = W + t * module.scaling["default"] * (B @ A)
            with torch.no_grad():
                weights[key].copy_((m_t / V.norm(dim=1))[:, None] * V)
    return plain


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@contextlib.contextmanager
def _scaling_only(peft_model: PeftModel, t: float):
    """The old scaling: `scaling` times t, the magnitude left as trained."""
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    saved = [m.scaling["default"] for m in layers]
    for module in layers:
        module.scaling["default"] *= t
    yield
    for module, s in zip(layers, saved):
        module.scaling["default"] = s


IDS = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_a_scaled_dora_adapter_equals_its_brute_force_reconstruction(t):
    peft_model = _dora()
    with adapter_scale(peft_model, t):
        scaled = _logits(peft_model, IDS)
    expected = _logits(_reconstructed(peft_model, t), IDS)
    full_change = (_logits(_reconstructed(peft_model, 1.0), IDS) - _logits(_reconstructed(peft_model, 0.0), IDS)).abs().max()
    assert (scaled - expected).abs().max() < 1e-4 * full_change
    # the negative control: scaling `scaling` alone is off by a large part of the full change
    if t < 1.0:
        with _scaling_only(peft_model, t):
            assert (_logits(peft_model, IDS) - expected).abs().max() > 0.05 * full_change
    # restored afterwards: the adapter at scale 1 again
    assert torch.allclose(_logits(peft_model, IDS), _logits(_reconstructed(peft_model, 1.0), IDS), atol=1e-4)


def test_dora_at_scale_zero_is_the_base_and_its_delta_norm_is_measured():
    peft_model = _dora()
    with adapter_scale(peft_model, 0.0):
        at_zero = _logits(peft_model, IDS)
    with peft_model.disable_adapter():
        base = _logits(peft_model, IDS)
    assert (at_zero - base).abs().max() < 1e-5
    assert scaled_delta_norm(peft_model, 0.0) < 1e-6
    # the norm of the materialised change, not t times the low-rank term's
    full = sum(float(((_reconstructed(peft_model, 1.0).get_parameter(n.removeprefix("base_model.model.") + ".weight")
                      .detach().double() - m.get_base_layer().weight.double()) ** 2).sum())
               for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)) ** 0.5
    assert scaled_delta_norm(peft_model, 1.0) == pytest.approx(full, rel=1e-6)


def test_a_calibrated_dora_adapter_loads_in_plain_peft_as_the_scaled_model(tmp_path):
    peft_model = _dora()
    peft_model.save_pretrained(tmp_path / "adapter")
    fold_scale(tmp_path / "adapter", (tmp_path / "half").mkdir() or tmp_path / "half", 0.5,
               scaled_magnitudes(peft_model, 0.5))
    base = tiny_model(vocab_size=259, hidden_size=32, intermediate_size=48, seed=0)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "half")).eval()
    assert (_logits(loaded, IDS) - _logits(_reconstructed(peft_model, 0.5), IDS)).abs().max() < 1e-4
    with pytest.raises(Exception, match="DoRA magnitude needs the base"):
        fold_scale(tmp_path / "adapter", (tmp_path / "x").mkdir() or tmp_path / "x", 0.5)
