"""End to end on the tiny recipe: what a run writes, what changes, what must not."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import assert_adapters_match

from workbench.config.recipe import load_recipe
from workbench.training.run import build_trainer, train

FAST = ["train.max_steps=4", "train.eval_steps=2", "data.max_examples=32"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


def test_tiny_all_writes_run_json_with_every_term_and_resolved_knobs(tmp_path):
    run_dir = train(load_recipe("recipes/tiny_all.yaml", FAST), tmp_path / "run")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["world_size"] == 1
    steps = [h for h in run["history"] if "task_loss" in h]
    assert len(steps) == 4
    for term in ("kl_to_base", "ewc", "delta_l2"):
        assert all(term in h and f"{term}_weighted" in h for h in steps)
    assert steps[-1]["kl_to_base"] > 0 and steps[-1]["ewc"] > 0
    regs = run["recipe"]["regularizers"]
    assert (regs["label_smoothing"], regs["lora_dropout"], regs["weight_decay"]) == (0.1, 0.05, 0.01)
    assert run["fisher"]["estimator"] == "kfac_diag"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


def test_training_changes_every_trainable_parameter_and_no_frozen_one(tmp_path):
    recipe = load_recipe("recipes/tiny_all.yaml", FAST)
    trainer, _ = build_trainer(recipe, tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in trainable), name


def test_gradient_accumulation_and_batch_split_give_the_same_adapter(tmp_path):
    """Penalties and label smoothing are normalised like the task loss: 1x4 and 2x2 micro-batches
    agree."""
    common = FAST + ["regularizers.lora_dropout=0", "regularizers.label_smoothing=0.1",
                     "regularizers.kl_to_base.warmup_steps=0", "train.eval_steps=null",
                     "data.val_fraction=0"]
    adapters = []
    for i, (bs, ga) in enumerate([(4, 1), (2, 2)]):
        recipe = load_recipe("recipes/tiny_all.yaml", common + [f"train.batch_size={bs}",
                                                                f"train.grad_accum={ga}"])
        run_dir = train(recipe, tmp_path / f"run{i}")
        adapters.append(load_file(run_dir / "adapter" / "adapter_model.safetensors"))
    assert_adapters_match(adapters[0], adapters[1], rtol=1e-4, atol=1e-5, norm_tol=1e-2, min_close=0.9)


def test_early_stopping_stops_a_run_whose_validation_loss_stops_improving(tmp_path):
    recipe = load_recipe("recipes/tiny.yaml", [
        "train.max_steps=40", "train.eval_steps=1", "train.learning_rate=0.3",
        "train.early_stopping.patience=2", "data.max_examples=32"])
    trainer, _ = build_trainer(recipe, tmp_path / "run")
    assert trainer.args.load_best_model_at_end and trainer.args.metric_for_best_model == "eval_loss"
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert trainer.state.global_step < 40
    best = min(evals)
    assert evals.index(best) == len(evals) - 3  # stopped after `patience` evaluations without a new best


def test_optimizer_side_knobs_reach_the_trainer(tmp_path):
    recipe = load_recipe("recipes/tiny.yaml", [
        "regularizers.neftune_alpha=5", "regularizers.weight_decay=0.1", "train.max_grad_norm=0.5",
        "regularizers.label_smoothing=0.1", "regularizers.lora_dropout=0.2"])
    trainer, record = build_trainer(recipe, tmp_path / "run")
    args = trainer.args
    assert (args.neftune_noise_alpha, args.weight_decay, args.max_grad_norm, args.label_smoothing_factor) == (
        5, 0.1, 0.5, 0.1)
    assert trainer.model.peft_config["default"].lora_dropout == 0.2
    assert record.recipe["regularizers"]["lora_dropout"] == 0.2


def test_kl_from_a_full_top_k_cache_trains_the_same_adapter_as_the_exact_kl(tmp_path):
    """With k = the vocabulary the cached reference is the base's whole distribution, so training
    against it must reproduce the exact KL's run; a second run reuses the cache."""
    common = FAST + ["regularizers.kl_to_base.weight=2.0", "regularizers.lora_dropout=0", "train.eval_steps=null",
                     "data.val_fraction=0"]
    exact = train(load_recipe("recipes/tiny.yaml", common), tmp_path / "exact")
    cached_args = common + ["regularizers.kl_to_base.reference=topk_cache", "regularizers.kl_to_base.top_k=512"]
    cached = train(load_recipe("recipes/tiny.yaml", cached_args), tmp_path / "cached")
    adapters = [load_file(d / "adapter" / "adapter_model.safetensors") for d in (exact, cached)]
    assert_adapters_match(adapters[0], adapters[1], rtol=1e-4, atol=1e-5, norm_tol=1e-3, min_close=0.99)
    record = json.loads((cached / "run.json").read_text())["reference_cache"]
    assert record["cached"] is False and record["top_k"] < 512  # min(k, vocab)
    again = train(load_recipe("recipes/tiny.yaml", cached_args + ["train.max_steps=2"]), tmp_path / "again")
    assert json.loads((again / "run.json").read_text())["reference_cache"]["cached"] is True

