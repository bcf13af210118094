"""LoRA initialisations: each starts at the base, keeps the base reachable with the adapter off,
trains what PEFT would train, and saves an adapter that plain PEFT loads on the real base."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests.helpers import make_batch, per_token_value
from workbench.config.recipe import INITS_REWRITING_BASE, LORA_INITS, LoraSection
from workbench.errors import UsageError
from workbench.modeling import lora_init
from workbench.modeling.load import apply_lora
from workbench.modeling.lora import lora_factors
from workbench.modeling.tiny import tiny_model
from workbench.training.regularizers.delta_l2 import DeltaL2
from workbench.training.regularizers.kl import KLConfig, KLToBase
from workbench.training.regularizers.base import PenaltyConfig

BATCH = make_batch(batch=4, seq=16)
AT_INIT = 1e-5  # measured: at most 1.3e-6 on the tiny model (pissa; B0 A0 - B0 A0 rounds in the matmul)


def base():
    return tiny_model(vocab_size=259, hidden_size=32, intermediate_size=48, seed=0)


def batches():
    for seed in range(4):
        yield make_batch(batch=8, seq=24, seed=seed)


def logits(model):
    with torch.no_grad():
        return model(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits


def wrapped(init, **section):
    return apply_lora(base(), LoraSection(r=4, alpha=8, init=init, **section), 0.0, batches)


@pytest.mark.parametrize("init", LORA_INITS)
def test_every_init_starts_at_the_base_and_the_adapter_off_is_the_base(init):
    reference, model = logits(base()), wrapped(init)
    torch.testing.assert_close(logits(model), reference, rtol=0, atol=AT_INIT)
    with model.disable_adapter():  # KL-to-base's reference, the probe's and the eval's base
        assert torch.equal(logits(model), reference)
    model.train()
    kl = per_token_value(lambda base: KLToBase(KLConfig(weight=1.0)).term(model, BATCH, base), model, BATCH)
    assert abs(kl.item()) < 1e-6
    delta = DeltaL2(PenaltyConfig(weight=1.0)).term(model, BATCH, None)  # EWC's dW, unweighted
    assert delta.item() < 1e-10


def test_without_restoring_the_base_the_adapter_off_is_not_the_base():
    """Negative control: PEFT's own PiSSA leaves W_res in the base, so the checks above would fail."""
    reference = logits(base())
    native = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights="pissa"))
    with native.disable_adapter():
        assert (logits(native) - reference).abs().max() > 100 * AT_INIT


@pytest.mark.parametrize("init", INITS_REWRITING_BASE)
def test_an_adamw_step_moves_the_trained_half_only(init):
    model = wrapped(init)
    frozen = {n: (p[4:] if "lora_A" in n else p[:, 4:]).detach().clone()
              for n, p in model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model(**BATCH).loss.backward()
    optimizer.step()
    moved = 0.0
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert torch.equal(param[4:] if "lora_A" in name else param[:, 4:], frozen[name]), name
            moved = max(moved, (param.grad.abs().max()).item())
    assert moved > 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_trained_half_gets_the_gradient_peft_gives_its_own_init(init):
    """PEFT's PiSSA/OLoRA on its rewritten base W_res, and ours on the real base with the frozen
    half, compute the same function, so the first half's gradient is PEFT's."""
    ours = wrapped(init)
    native = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights=init))
    ours(**BATCH).loss.backward()
    native(**BATCH).loss.backward()
    mine = dict(ours.named_parameters())
    checked = 0
    for name, param in native.named_parameters():
        if "lora_" in name:
            half = mine[name].grad[:4] if "lora_A" in name else mine[name].grad[:, :4]
            torch.testing.assert_close(half, param.grad, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 decoder layers


@pytest.mark.parametrize("init", LORA_INITS)
def test_the_saved_adapter_loads_in_plain_peft_on_the_base_and_scores_as_in_training(init, tmp_path):
    model = wrapped(init)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(**BATCH).loss.backward()
        optimizer.step()
    model.eval()
    trained = logits(model)
    assert (trained - logits(base())).abs().max() > 1e-3  # it moved
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(), str(tmp_path))
    torch.testing.assert_close(logits(loaded), trained, rtol=0, atol=1e-5)


def test_presets_pick_the_attention_or_the_mlp_layers_and_layers_picks_the_decoder_layers():
    attention = wrapped("default", target_modules="attention", layers="1-1")
    names = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
             for n, _ in attention.named_parameters() if "lora_A" in n}
    assert names == {f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mlp = wrapped("default", target_modules="mlp")
    keys = {f.key for f in lora_factors(mlp)}
    assert keys == {f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("section, message", [
    ({"layers": "1-2"}, "lora.layers 1-2: LlamaForCausalLM has 2 decoder layers, numbered 0-1"),
    ({"init": "orthogonal", "r": 3}, "lora.init orthogonal: Orthogonal initialization requires the LoRA rank to be even"),
    ({"init": "mica", "r": 40}, "lora.init mica: MiCA requires `r` <= min(in_features, out_features)"),
    ({"target_modules": ["q_prj"]}, "lora.target_modules: no module named 'q_prj'"),
])
def test_bad_lora_sections_give_one_line(section, message):
    with pytest.raises(UsageError) as info:
        apply_lora(base(), LoraSection(**{"r": 4, "alpha": 8, **section}), 0.0, batches)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_init_that_needs_data_refuses_to_run_without_it():
    with pytest.raises(UsageError, match="lora.init corda_kpm computes its factors from data"):
        apply_lora(base(), LoraSection(r=4, alpha=8, init="corda_kpm"), 0.0, None)


@pytest.mark.parametrize("init", ["corda_kpm", "eva"])
def test_data_driven_inits_are_cached_and_a_damaged_entry_is_computed_again(init, tmp_path, monkeypatch):
    cache = tmp_path / ("init.pt" if init.startswith("corda") else "init.safetensors")
    first = apply_lora(base(), LoraSection(r=4, alpha=8, init=init), 0.0, batches, cache)
    assert cache.is_file()

    def no_data():
        raise AssertionError("the cache was not used")
    again = apply_lora(base(), LoraSection(r=4, alpha=8, init=init), 0.0, no_data, cache)
    for (name, a), (_, b) in zip(first.named_parameters(), again.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    cache.write_bytes(b"damaged")
    redone = apply_lora(base(), LoraSection(r=4, alpha=8, init=init), 0.0, batches, cache)
    for (name, a), (_, b) in zip(first.named_parameters(), redone.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
