import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from tests.helpers import make_batch, make_peft, per_token_value
from workbench.training.regularizers import PenaltyConfig
from workbench.training.regularizers.delta_l2 import DeltaL2
from workbench.training.regularizers.kl import KLConfig, KLToBase
from workbench.training.trainer import RegularizedTrainer


def trainer_for(model, tmp_path, penalties=(), loss="nll", loss_head="fused", **args):
    defaults = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=2,
                    remove_unused_columns=False, disable_tqdm=True, max_steps=1)
    return RegularizedTrainer(model=model, args=TrainingArguments(**{**defaults, **args}),
                              penalties=list(penalties), loss=loss, loss_head=loss_head)


def smoothed_ce(logits, labels, eps):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, label_smoothing=eps)


@pytest.mark.parametrize("loss_head", ["fused", "full"])
def test_label_smoothing_matches_cross_entropy_over_unmasked_tokens(tmp_path, loss_head):
    model, batch = make_peft(), make_batch()
    trainer = trainer_for(model, tmp_path, label_smoothing_factor=0.2, loss_head=loss_head)
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss, smoothed_ce(logits, batch["labels"], 0.2), rtol=1e-5, atol=1e-6)
    model.eval()  # validation loss is plain NLL so recipes stay comparable
    loss = trainer.compute_loss(model, dict(batch))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss, smoothed_ce(logits, batch["labels"], 0.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_head", ["fused", "full"])
def test_penalties_are_added_with_their_weights_and_logged(tmp_path, loss_head):
    model, batch = make_peft(), make_batch()
    kl = KLToBase(KLConfig(weight=0.3))
    l2 = DeltaL2(PenaltyConfig(weight=0.05))
    plain = trainer_for(model, tmp_path, loss_head="full")
    trainer = trainer_for(model, tmp_path, penalties=[kl, l2], loss_head=loss_head)
    model.train()
    task, outputs = plain.compute_loss(model, dict(batch), return_outputs=True)
    total = trainer.compute_loss(model, dict(batch))
    kl_value = per_token_value(lambda base: kl.term(model, batch, base), model, batch, fused=False)
    expected = task + 0.3 * kl_value + 0.05 * l2.term(model, batch, None)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    logs = {"loss": total.item()}
    trainer.log(logs)
    assert set(logs) >= {"task_loss", "kl_to_base", "kl_to_base_weighted", "delta_l2", "delta_l2_weighted"}
    assert logs["kl_to_base_weighted"] == pytest.approx(0.3 * logs["kl_to_base"], rel=1e-6)
    assert logs["task_loss"] == pytest.approx(task.item(), rel=1e-5)


def test_weight_decay_groups_exclude_biases_and_norms(tmp_path):
    config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=24, attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(config)
    trainer = trainer_for(model, tmp_path, weight_decay=0.1)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    undecayed = [names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert decayed and undecayed
    assert not any("bias" in n or "norm" in n for n in decayed)
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert any(n.endswith(".bias") for n in undecayed) and any("norm" in n for n in undecayed)
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))


def test_a_non_finite_term_stops_before_backward_naming_it(tmp_path):
    from workbench.errors import RunFailed

    class Scaled(DeltaL2):
        def term(self, model, inputs, base):
            return super().term(model, inputs, base) * float("inf")

    model = make_peft()
    trainer = trainer_for(model, tmp_path, penalties=[Scaled(PenaltyConfig(weight=1.0))])
    model.train()
    with pytest.raises(RunFailed, match=r"diverged at step 1: non-finite delta_l2=inf, delta_l2_weighted=inf"):
        trainer.compute_loss(model, make_batch())
    assert not trainer._terms  # nothing half-logged


def test_fp16_trains_through_the_fused_head(tmp_path):
    """fp16 is a precision of the loss engine (its head in fp32, its gradients kept fp32 until the
    loss scale reaches them: tests/training/test_head.py), not a second path."""
    trainer = trainer_for(make_peft(), tmp_path, fp16=True)
    assert trainer.loss_head == "fused" and trainer._full_head_reason() is None


def test_a_non_finite_gradient_is_refused_unless_a_loss_scaler_will_skip_the_step(tmp_path):
    from workbench.errors import RunFailed
    model = make_peft()
    trainer = trainer_for(model, tmp_path)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(RunFailed, match="non-finite gradient"):
        trainer._get_grad_norm(model)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")  # fp16: an overflow skips the step, lowers the scale
    assert math.isinf(float(trainer._get_grad_norm(model)))
