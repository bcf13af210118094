"""FLOW example weights: the formula on hand-computed losses, the weighted task loss's reference,
the base's losses against torch's cross-entropy, their cache, and the column every batch carries."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import repo
from workbench.config.recipe import load_recipe
from workbench.data.examples import EXAMPLE_WEIGHT, NOT_MODEL_INPUTS, Collator
from workbench.errors import UsageError
from workbench.modeling.load import load_model, load_tokenizer
from workbench.modeling.tiny import tiny_model
from workbench.scoring.masks import IGNORE, next_token_mask, shifted_labels
from workbench.training.example_weights import base_losses, flow_weights, weighted_token_mean
from workbench.training.run import build_trainer

FLOW = ["train.example_weights=flow", "data.max_examples=24", "train.batch_size=6", "train.max_steps=2",
        "train.eval_steps=null"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


def test_flow_weights_equal_the_formula_with_the_median_as_temperature():
    """Four losses: the median is (2 + 3) / 2 = 2.5 (numpy's, not torch.median's lower middle)."""
    weights, tau = flow_weights(torch.tensor([1.0, 2.0, 3.0, 5.0]))
    raw = [math.exp(-loss / 2.5) for loss in (1.0, 2.0, 3.0, 5.0)]
    assert tau == 2.5
    assert weights.tolist() == pytest.approx([r / (sum(raw) / 4) for r in raw], rel=1e-12)
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-12)


def test_flow_weights_with_a_given_temperature():
    """L = 0, ln 2, ln 4 at tau 1: raw 1, 1/2, 1/4, mean 7/12, so 12/7, 6/7, 3/7."""
    weights, tau = flow_weights(torch.tensor([0.0, math.log(2), math.log(4)], dtype=torch.float64), 1.0)
    assert tau == 1.0
    assert weights.tolist() == pytest.approx([12 / 7, 6 / 7, 3 / 7], rel=1e-12)


def test_flow_weights_refuse_a_zero_median():
    with pytest.raises(UsageError, match="set train.flow_temperature"):
        flow_weights(torch.tensor([0.0, 0.0, 1.0]))


def test_weighted_token_mean_by_hand():
    """(2 * (1 + 2) + 0.5 * 3) / 5: weighted per token, divided by the label tokens, not the weights."""
    loss = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert weighted_token_mean(loss, mask, torch.tensor([2.0, 0.5]), 5).item() == pytest.approx(1.5)
    assert weighted_token_mean(loss, mask, None, 5).item() == pytest.approx(6 / 5)


def _batch_loss(tokenizer, examples):
    """The task loss's pieces for a collated batch: per-token NLL [B, T-1], its mask, the weights."""
    batch = Collator(tokenizer.pad_token_id)(examples)
    logits = torch.randn(*batch["input_ids"].shape, 40, generator=torch.Generator().manual_seed(0))
    labels = shifted_labels(batch["labels"])
    per_token = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    mask = next_token_mask(batch["labels"])
    return per_token, mask, batch.get(EXAMPLE_WEIGHT)


def _examples(n=4):
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, 40, (5 + i,), generator=gen).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * 2 + ids[2:]})
    return out


def test_equal_base_losses_give_the_plain_task_loss_exactly(tokenizer):
    """Equal losses: every weight 1.0 exactly, so the weighted loss is the plain one bit for bit.
    Negative control: unequal losses give another loss."""
    examples = _examples()
    plain, mask, none = _batch_loss(tokenizer, examples)
    assert none is None  # no weights: no column
    n = mask.sum()
    reference = (plain * mask).sum() / n
    equal, _ = flow_weights(torch.full((4,), 2.7))
    assert equal.tolist() == [1.0] * 4
    loss, mask, w = _batch_loss(tokenizer, [{**e, EXAMPLE_WEIGHT: x} for e, x in zip(examples, equal.tolist())])
    assert torch.equal(weighted_token_mean(loss, mask, w, n), reference)
    unequal, _ = flow_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    loss, mask, w = _batch_loss(tokenizer, [{**e, EXAMPLE_WEIGHT: x} for e, x in zip(examples, unequal.tolist())])
    assert abs(weighted_token_mean(loss, mask, w, n) - reference) > 1e-3


def test_the_collator_passes_weights_the_model_never_sees(tokenizer):
    batch = Collator(tokenizer.pad_token_id)([{**e, EXAMPLE_WEIGHT: 0.5 * i} for i, e in enumerate(_examples())])
    assert batch[EXAMPLE_WEIGHT].dtype == torch.float32 and batch[EXAMPLE_WEIGHT].tolist() == [0, 0.5, 1, 1.5]
    assert EXAMPLE_WEIGHT in NOT_MODEL_INPUTS


def test_base_losses_equal_cross_entropy_of_a_plain_forward():
    model = tiny_model(vocab_size=40).eval()
    examples = _examples(5)
    losses = base_losses(model, examples, batch_size=2, pad_id=0)
    for example, loss in zip(examples, losses):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
        expected = F.cross_entropy(logits[:-1], torch.tensor(example["labels"][1:]), ignore_index=IGNORE)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_training_set_carries_the_bases_flow_weights_computed_once(tmp_path):
    recipe = load_recipe(repo("recipes/tiny.yaml"), FLOW)
    trainer, record = build_trainer(recipe, tmp_path / "a")
    summary = record.data["example_weights"]
    assert not summary["cached"] and summary["temperature_from"] == "median"
    weights = torch.tensor([example[EXAMPLE_WEIGHT] for example in trainer.train_dataset], dtype=torch.float64)
    base, _ = load_model(recipe.model, load_tokenizer(recipe.model))  # the same seeded weights, never adapted
    losses = base_losses(base.eval(), [{k: v for k, v in e.items() if k != EXAMPLE_WEIGHT}
                                       for e in trainer.train_dataset], 6, trainer.processing_class.pad_token_id)
    expected, tau = flow_weights(losses)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert summary["temperature"] == pytest.approx(tau, rel=1e-6) and weights.mean() == pytest.approx(1.0)
    assert summary["weight"]["max"] == pytest.approx(weights.max().item()) and weights.std() > 0.01
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch[EXAMPLE_WEIGHT].shape == batch["input_ids"].shape[:1]
    again, record = build_trainer(recipe, tmp_path / "b")
    assert record.data["example_weights"]["cached"]
    assert [e[EXAMPLE_WEIGHT] for e in again.train_dataset] == weights.tolist()


def test_no_weights_under_none(tmp_path):
    trainer, record = build_trainer(load_recipe(repo("recipes/tiny.yaml"), FLOW[1:]), tmp_path / "run")
    assert "example_weights" not in record.data
    assert all(EXAMPLE_WEIGHT not in example for example in trainer.train_dataset)


@pytest.mark.parametrize("loss_head", ["fused", "full"])
def test_the_trainer_weights_each_examples_task_loss_as_the_reference_does(tmp_path, loss_head):
    """The trainer's loss on a batch carrying `example_weight` equals `weighted_token_mean` of the
    per-token NLL of the model's own logits; weights of 1 give the plain loss bit for bit, and
    unequal weights another loss (the negative control)."""
    from tests.helpers import make_batch, make_peft
    from tests.training.test_trainer import trainer_for

    model, batch = make_peft(), make_batch()
    trainer = trainer_for(model, tmp_path, loss_head=loss_head)
    model.train()
    plain = trainer.compute_loss(model, dict(batch))
    weight = torch.tensor([0.5, 1.0, 2.0])
    weighted = trainer.compute_loss(model, {**batch, EXAMPLE_WEIGHT: weight})
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = shifted_labels(batch["labels"])
    per_token = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    mask = next_token_mask(batch["labels"])
    torch.testing.assert_close(weighted, weighted_token_mean(per_token, mask, weight, mask.sum()), rtol=1e-5, atol=1e-6)
    assert trainer.compute_loss(model, {**batch, EXAMPLE_WEIGHT: torch.ones(3)}).item() == plain.item()
    assert abs(weighted.item() - plain.item()) > 1e-3
