"""Every regularizer and the eval suite on tiny random models of each architecture
(`tiny-random-<architecture>`, docs/architectures.md): where they differ is what the workbench
reaches into, the LM head (tied, soft-capped, LoRA-targeted), fused QKV and GPT-2's Conv1D."""

import json

import pytest
import torch
import yaml
from peft.tuners.lora import LoraLayer

from tests.evals.test_evaluate import write_task
from tests.helpers import make_batch, repo
from workbench.cli import main
from workbench.config.recipe import ModelSection, load_recipe
from workbench.errors import UsageError
from workbench.evals.evaluate import run_eval
from workbench.modeling import head
from workbench.modeling.load import apply_lora, load_model
from workbench.modeling.tiny import ARCHITECTURES
from workbench.scoring.masks import next_token_mask
from workbench.scoring.scorer import Request, Scorer
from workbench.training import run
from workbench.training.engine import base_reference, chunked_loss
from workbench.training.terms import kl_term

# The default suite's architectures (4.5 to 10 s each, 55 s together on 2 CPU cores); the others run under -m slow.
FAST = ["llama", "qwen3", "gemma2", "gemma3", "mistral", "phi3", "gpt-neox", "gpt2"]
TARGETED_HEAD = {"llama": ["q_proj", "v_proj", "down_proj", "lm_head"],
                 "gpt-neox": ["query_key_value", "dense_4h_to_h", "lm_head"]}
SHAPE = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=48"]
SUITE = {"name": "arch", "batch_size": 8, "max_length": 64, "bootstrap": 20, "scales": [0.0],
         "general": {"num_chunks": 4, "chunk_length": 32, "top_k": 300},
         "multiple_choice": [{"local": "mc.yaml"}],
         "target": {"num_examples": 4, "max_new_tokens": 4}, "overfitting": {"num_examples": 4}}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    write_task(root, n=6)
    (root / "suite.yaml").write_text(yaml.safe_dump(SUITE))
    return root / "suite.yaml"


def recipe_for(arch: str, out, *extra):
    targets = TARGETED_HEAD.get(arch)
    return load_recipe(repo("recipes/tiny_all.yaml"), [
        f"model.name=tiny-random-{arch}", *SHAPE, "train.max_steps=2", "train.eval_steps=2",
        "data.max_examples=32", "regularizers.kl_to_base.warmup_steps=0", "regularizers.ewc.num_examples=8",
        f"train.output_dir={out}", *([f"lora.target_modules={json.dumps(targets)}"] if targets else []), *extra])


@torch.no_grad()
def ewc_by_definition(model, fisher: dict) -> float:
    """0.5 * sum over modules of sum(F * dW**2), with dW from PEFT's own get_delta_weight (which
    transposes for GPT-2's Conv1D, fan_in_fan_out) and F = g a^T: the penalty's r-by-r
    contraction must agree with it on every layout."""
    total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            delta = module.get_delta_weight("default").double()
            if module.fan_in_fan_out:
                delta = delta.T  # [in, out] as Conv1D stores it -> [out, in]
            key = name.removeprefix("base_model.model.")
            total += float((torch.outer(fisher[f"{key}.g"], fisher[f"{key}.a"]).double() * delta**2).sum())
    return 0.5 * total


def check_architecture(arch: str, tmp_path, suite) -> None:
    recipe = recipe_for(arch, tmp_path / "run")
    trainer, record = run.build_trainer(recipe, tmp_path / "run")
    model = trainer.model
    base = model.get_base_model()
    head = base.get_output_embeddings()
    tied = base.get_input_embeddings().weight is getattr(head, "base_layer", head).weight
    assert tied == bool(base.config.get_text_config().tie_word_embeddings), arch
    if arch in TARGETED_HEAD:
        assert isinstance(head, LoraLayer), "the head carries LoRA factors"
    trainer.train()
    steps = [h for h in trainer.state.log_history if "task_loss" in h]
    # step 1 runs at B = 0: the tuned model is the base, so the KL against the reference is exactly 0
    assert steps[0]["kl_to_base"] == 0.0 and steps[-1]["kl_to_base"] > 0, arch
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in steps)
    ewc = next(p for p in trainer.penalties if p.name == "ewc")
    fisher, _ = run.fisher_for(recipe, model, trainer.processing_class, record.model_fingerprint)
    expected = ewc_by_definition(model, fisher)
    assert expected > 0 and float(ewc.term(model, {}, None)) == pytest.approx(expected, rel=1e-4), arch
    if arch in TARGETED_HEAD:
        assert head.lora_B["default"].weight.abs().max() > 0, "the head's LoRA trained"
    # shared-context scoring (a KV cache per item) answers as scoring each request whole
    requests = [Request("Q: 3 plus 4?\nA:", f" {c}") for c in ("7", "8", "many")]
    shared = Scorer(model, trainer.processing_class, share_context=True).loglikelihood(requests)
    whole = Scorer(model, trainer.processing_class, share_context=False).loglikelihood(requests)
    assert [r.logprob for r in shared] == pytest.approx([r.logprob for r in whole], rel=1e-4, abs=1e-4)
    trainer.save_model(str(tmp_path / "run" / "adapter"))
    record.status, record.adapter = "completed", "adapter"
    record.write(tmp_path / "run")
    entries = {e["name"]: {k: m["value"] for k, m in e["metrics"].items()}
               for e in run_eval(suite, runs=[tmp_path / "run"])["entries"]}
    tuned, at_zero = entries[recipe.name], entries[f"{recipe.name}@0"]
    assert at_zero["retention.general.kl"] == pytest.approx(0.0, abs=1e-6)
    assert tuned["retention.general.kl"] > 1e-6 and tuned["learning.val_loss.tuned"] > 0


@pytest.mark.parametrize("arch", FAST)
def test_architecture_trains_with_every_regularizer_and_evaluates(arch, tmp_path, suite, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    check_architecture(arch, tmp_path, suite)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in FAST])
def test_more_architectures(arch, tmp_path, suite, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    check_architecture(arch, tmp_path, suite)


POST_HEAD = {"gemma2": ("final_logit_softcapping", 2.0), "cohere": ("logit_scale", 0.0625),
             "granite": ("logits_scaling", 4.0)}


@pytest.mark.parametrize("arch", list(POST_HEAD))
def test_the_one_head_applies_each_post_head_step_for_training_and_the_reference(arch, monkeypatch):
    """Gemma 2 soft-caps its logits, Cohere multiplies them by logit_scale, Granite divides them by
    logits_scaling. The one LM head (`modeling.head`) applies each, so the loss engine's logits
    through it equal the forward's and the KL to the base is 0 at init; a head without the step
    scores another distribution, and `check_head` refuses it (the negative control)."""
    model, _ = load_model(ModelSection(name=f"tiny-random-{arch}", tiny={"hidden_size": 32, "intermediate_size": 48}))
    key, value = POST_HEAD[arch]
    setattr(model.config, key, value)  # the released soft-cap 30 barely bends logits of a random model
    if arch == "cohere":
        model.logit_scale = value
    torch.manual_seed(0)
    peft_model = apply_lora(model, load_recipe(repo("recipes/tiny.yaml")).lora, 0.0)
    assert head.unsupported(peft_model) is None
    batch = make_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = peft_model(**inputs).logits.detach()
    hidden, _ = head.final_hidden(peft_model, **inputs)
    torch.testing.assert_close(head.lm_head(peft_model)(hidden), logits, rtol=1e-5, atol=1e-6)
    mask = next_token_mask(batch["labels"])
    ref_hidden, ref_head = base_reference(peft_model, batch, fused=True)
    kl, _ = chunked_loss(hidden, head.lm_head(peft_model), mask, [kl_term(ref_hidden, ref_head)], [1.0], 4)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    bare, _ = chunked_loss(logits, None, mask, [kl_term(ref_hidden, model.get_output_embeddings())], [1.0], 4)
    assert bare.item() > 1e-3  # the bug this guards against
    head.check_head(peft_model, f"tiny-random-{arch}")
    monkeypatch.setattr(head, "_post_head", lambda lm: {})
    with pytest.raises(UsageError, match="changes the logits after the LM head"):
        head.check_head(peft_model, f"tiny-random-{arch}")


def test_unknown_architecture_is_one_line_exit_2(tmp_path, capsys):
    code = main(["train", repo("recipes/tiny.yaml"), "model.name=tiny-random-nope", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tiny architecture 'nope'" in err[0] and "gpt2" in err[0], err
