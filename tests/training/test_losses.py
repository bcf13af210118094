"""The task losses through the loss engine: DFT against a direct torch implementation and its
closed-form gradient, per-example weights against the weighted sum, and anchored SFT (DFT +
KL-to-base) against the sum of its parts."""

import pytest
import torch

from tests.helpers import make_batch, make_peft, per_token_value
from tests.training.test_trainer import trainer_for
from workbench.scoring.masks import next_token_mask
from workbench.training.engine import chunked_loss
from workbench.training.regularizers.kl import KLConfig, KLToBase
from workbench.training.terms import task_term


def causal_lm_loss(outputs, labels, num_items_in_batch=None, loss="nll", example_weight=None):
    """The engine's task loss over whole logits, per label token (or per num_items_in_batch)."""
    mask = next_token_mask(labels)
    term = task_term(labels, loss, example_weight=example_weight)
    total, _ = chunked_loss(outputs["logits"], None, mask, [term], [1.0], 3)
    return total / (mask.sum() if num_items_in_batch is None else num_items_in_batch)


def direct_dft(logits, labels):
    """DFT as published, written plainly: mean over label tokens of -sg(p(y)) log p(y)."""
    log_p = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    mask = target != -100
    log_py = log_p.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return -(log_py.exp().detach() * log_py)[mask].sum() / mask.sum()


def hand_batch():
    """Two rows of 4 positions over a 5-token vocabulary; row 1 has a masked prompt and padding."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64).float().requires_grad_()
    labels = torch.tensor([[-100, 1, 4, 0], [-100, -100, 2, -100]])
    return logits, labels


def test_dft_loss_and_gradient_equal_a_direct_torch_implementation():
    logits, labels = hand_batch()
    ours = causal_lm_loss({"logits": logits}, labels, loss="dft")
    (grad,) = torch.autograd.grad(ours, logits)
    direct = direct_dft(logits, labels)
    (direct_grad,) = torch.autograd.grad(direct, logits)
    torch.testing.assert_close(ours, direct, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, direct_grad, rtol=1e-6, atol=1e-7)


def test_dft_gradient_is_the_probability_weighted_cross_entropy_gradient():
    """Closed form: d/dz [-sg(p_y) log p_y] = p_y (softmax(z) - onehot(y)), divided by the tokens."""
    logits, labels = hand_batch()
    (grad,) = torch.autograd.grad(causal_lm_loss({"logits": logits}, labels, loss="dft"), logits)
    expected = torch.zeros_like(logits)
    z, target = logits.detach()[:, :-1], labels[:, 1:]
    rows, cols = (target != -100).nonzero(as_tuple=True)
    for b, t in zip(rows.tolist(), cols.tolist()):
        q = torch.softmax(z[b, t], -1)
        onehot = torch.nn.functional.one_hot(target[b, t], 5).float()
        expected[b, t] = q[target[b, t]] * (q - onehot) / len(rows)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    # negative control: without the detach the gradient is -(1 + log p) dp, off by far more
    log_p = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    undetached = -(log_p.exp() * log_p)[target != -100].mean()
    (wrong,) = torch.autograd.grad(undetached, logits)
    assert not torch.allclose(wrong, expected, rtol=1e-5, atol=1e-7)


def test_dft_is_normalised_like_the_task_loss_under_accumulation():
    """Summed over label tokens and divided by the accumulated batch's tokens when given."""
    logits, labels = hand_batch()
    per_token = direct_dft(logits, labels) * next_token_mask(labels).sum()
    summed = causal_lm_loss({"logits": logits}, labels, num_items_in_batch=10, loss="dft")
    torch.testing.assert_close(summed, per_token / 10)


def test_dft_refuses_label_smoothing():
    with pytest.raises(ValueError, match="no DFT form"):
        task_term(hand_batch()[1], "dft", 0.1)


@pytest.mark.parametrize("loss", ["nll", "dft"])
def test_example_weights_multiply_each_token_of_their_example(loss):
    """sum_i w_i sum_t loss_it / tokens, in value and gradient: row 0 has 3 label tokens, row 1 one."""
    logits, labels = hand_batch()
    weight = torch.tensor([0.25, 3.0])
    ours = causal_lm_loss({"logits": logits}, labels, loss=loss, example_weight=weight)
    log_p = torch.log_softmax(logits[:, :-1], -1)
    target = labels[:, 1:]
    mask = target != -100
    log_py = log_p.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    per_token = -(log_py.exp().detach() * log_py) if loss == "dft" else -log_py
    direct = (weight[:, None] * per_token)[mask].sum() / mask.sum()
    torch.testing.assert_close(ours, direct, rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(ours, logits), torch.autograd.grad(direct, logits)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_equal_example_weights_of_one_are_plain_training_and_unequal_ones_are_not():
    logits, labels = hand_batch()
    plain = causal_lm_loss({"logits": logits}, labels)
    assert causal_lm_loss({"logits": logits}, labels, example_weight=torch.ones(2)).item() == plain.item()
    unequal = causal_lm_loss({"logits": logits}, labels, example_weight=torch.tensor([0.5, 1.5]))
    assert abs(unequal.item() - plain.item()) > 1e-3


def test_anchored_sft_is_dft_plus_the_kl_term_in_value_and_gradient(tmp_path):
    model, batch = make_peft(), make_batch()
    kl = KLToBase(KLConfig(weight=0.7))
    dft = trainer_for(model, tmp_path, loss="dft", loss_head="full")  # its outputs are the logits
    anchored = trainer_for(model, tmp_path, loss="dft", penalties=[kl])
    model.train()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    task, outputs = dft.compute_loss(model, dict(batch), return_outputs=True)
    direct = direct_dft(outputs.logits, batch["labels"])
    torch.testing.assert_close(task, direct, rtol=1e-5, atol=1e-7)
    expected = direct + 0.7 * per_token_value(lambda base: kl.term(model, batch, base), model, batch, fused=False)
    expected_grads = torch.autograd.grad(expected, lora)
    total = anchored.compute_loss(model, dict(batch))
    grads = torch.autograd.grad(total, lora)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-7)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # negative control: plain NLL plus the same KL is a different loss
    nll = trainer_for(model, tmp_path, penalties=[kl]).compute_loss(model, dict(batch))
    assert abs(nll.item() - total.item()) > 1e-3


def test_validation_loss_stays_plain_nll_under_dft(tmp_path):
    model, batch = make_peft(), make_batch()
    plain, dft = trainer_for(model, tmp_path), trainer_for(model, tmp_path, loss="dft")
    model.eval()
    torch.testing.assert_close(dft.compute_loss(model, dict(batch)), plain.compute_loss(model, dict(batch)))
