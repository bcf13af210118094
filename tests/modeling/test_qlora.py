"""QLoRA: LoRA on a bitsandbytes 4-bit (nf4) base, on whatever device bitsandbytes quantises on
(the CPU here): gradients, training with KL-to-base and EWC, the saved adapter in plain PEFT, evals."""

import pytest
import torch
import yaml
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tests.helpers import make_batch, repo
from workbench.config.recipe import LoraSection, ModelSection, load_recipe
from workbench.evals.evaluate import run_eval
from workbench.modeling import load
from workbench.modeling.load import apply_lora, load_model
from workbench.modeling.tiny import tiny_model, tiny_tokenizer
from workbench.training import run

SHAPE = {"hidden_size": 32, "intermediate_size": 48}
TOL = 1e-4  # relative to the largest gradient: both sides run fp32 matmuls on the same dequantised weights


def quantised(compute: str = "float32", shape=SHAPE):
    model, _ = load_model(ModelSection(name="tiny-random-llama", tiny=shape, load_in_4bit=True,
                                       bnb_4bit_compute_dtype=compute))
    return model


def with_lora(model):
    torch.manual_seed(0)
    peft_model = apply_lora(model, LoraSection(r=4), 0.0)
    gen = torch.Generator().manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    return peft_model


def gradients(model, batch) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def worst(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)


def test_4bit_lora_gradients_are_the_dequantised_model_s_after_an_eval_pass(monkeypatch):
    """The 4-bit model's LoRA gradients equal those of an fp32 model holding its dequantised
    weights, also after an eval-mode pass without grad (what the KL reference and evals run):
    bitsandbytes' CPU inference kernel, which has no backward, must not take over training."""
    four = with_lora(quantised())
    plain = tiny_model(259, **SHAPE)
    for name, module in four.get_base_model().named_modules():
        if type(module).__name__ == "Linear4bit":
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            plain.get_submodule(name.removesuffix(".base_layer")).weight.data = weight
    plain = with_lora(plain)
    batch = make_batch()
    expected_logits, expected = gradients(plain, batch)
    logits, got = after_eval_pass(four, batch)
    assert (logits - expected_logits).abs().max() <= TOL * expected_logits.abs().max()
    assert got.keys() == expected.keys() and worst(expected, got) <= TOL


def after_eval_pass(model, batch):
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    return gradients(model, batch)


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks for its CPU kernel only with AVX512-BF16")
def test_an_eval_pass_leaves_4bit_gradients_unchanged_in_bf16_compute():
    """The default compute dtype (bf16), where bitsandbytes' CPU inference kernel would take
    over: gradients before and after an eval pass are identical; with its repacking allowed again
    (the negative control) they are off by more than 100x the tolerance above."""
    model = with_lora(quantised("bfloat16", shape={}))  # hidden 64: at 32 the repacked weight fails loudly
    batch = make_batch()
    before = gradients(model, batch)[1]
    assert worst(before, after_eval_pass(model, batch)[1]) == 0.0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    assert worst(before, after_eval_pass(model, batch)[1]) > 100 * TOL


def test_4bit_is_refused_in_one_line_where_bitsandbytes_cannot_quantise(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr("bitsandbytes.functional.quantize_4bit", no_kernel)
    monkeypatch.setattr(load, "tiny_model", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(load.UsageError, match=r"model.load_in_4bit: bitsandbytes cannot quantise on \w+ here "
                                              r"\(no kernel for this device\)"):
        load_model(ModelSection(name="tiny-random-llama", load_in_4bit=True))


def test_qlora_trains_with_kl_and_ewc_and_its_adapter_loads_in_plain_peft(tmp_path, monkeypatch):
    """tiny_all (KL-to-base, EWC, every other regularizer) on a 4-bit base; the adapter saved,
    loaded by plain transformers + PEFT on the same 4-bit base, scores the logits the trainer's
    model scores; `workbench eval` with an adapter-scale sweep runs on the 4-bit base."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    recipe = load_recipe(repo("recipes/tiny_all.yaml"), [
        "model.load_in_4bit=true", "model.tiny.num_hidden_layers=1", "train.max_steps=2", "data.val_fraction=0",
        "data.max_examples=16", "regularizers.kl_to_base.warmup_steps=0", "regularizers.ewc.num_examples=4",
        f"train.output_dir={out}"])  # hidden 64 (the default): at 32 plain bitsandbytes' CPU kernel fails
    run.train(recipe)
    record = yaml.safe_load((out / "run.json").read_text())
    steps = [h for h in record["history"] if "task_loss" in h]
    assert steps[0]["kl_to_base"] == 0.0 and steps[-1]["kl_to_base"] > 0 and steps[-1]["ewc"] > 0

    ours, tokenizer = load_model(recipe.model)
    ours = PeftModel.from_pretrained(ours, str(out / "adapter")).eval()
    tiny_model(len(tokenizer), num_hidden_layers=1).save_pretrained(tmp_path / "base")
    m = recipe.model
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=m.bnb_4bit_quant_type, bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant))
    plain = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    batch = make_batch()
    with torch.no_grad():
        expected = ours(input_ids=batch["input_ids"]).logits.float()
        got = plain(input_ids=batch["input_ids"]).logits.float()
    with torch.no_grad():
        with plain.disable_adapter():
            without = plain(input_ids=batch["input_ids"]).logits.float()
    difference, adapter = [(x - expected).abs().max() / expected.abs().max() for x in (got, without)]
    print(f"plain PEFT vs training: {difference:.2g} of the logits' scale; the adapter's effect {adapter:.2g}")
    # bf16 compute on both sides, through different CPU kernels (plain bitsandbytes repacks for its
    # inference kernel in eval mode): 2% of the logits' scale, and the adapter moves them 5x that
    assert difference <= 0.02 and adapter > 0.1

    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({
        "name": "q", "batch_size": 8, "max_length": 64, "bootstrap": 20, "scales": [0.0, 0.5],
        "general": {"num_chunks": 2, "chunk_length": 32, "top_k": 300}, "target": None, "overfitting": None}))
    entries = {e["name"]: {k: v["value"] for k, v in e["metrics"].items()}
               for e in run_eval(tmp_path / "suite.yaml", runs=[out])["entries"]}
    kl = [entries[f"tiny_all{s}"]["retention.general.kl"] for s in ("@0", "@0.5", "")]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[0] < kl[1] < kl[2]
