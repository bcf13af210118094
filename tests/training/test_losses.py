"""The task losses: DFT against a direct torch implementation and its closed-form gradient, and
anchored SFT (DFT + KL-to-base) against the sum of its parts."""

import pytest
import torch

from tests.helpers import make_batch, make_peft
from tests.training.test_trainer import trainer_for
from workbench.training.losses import causal_lm_loss, token_losses
from workbench.training.regularizers.kl import KLConfig, KLToBase


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
    per_token = token_losses(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1), "dft")
    assert per_token[labels[:, 1:].reshape(-1) == -100].abs().max() == 0
    summed = causal_lm_loss({"logits": logits}, labels, num_items_in_batch=10, loss="dft")
    torch.testing.assert_close(summed, per_token.sum() / 10)


def test_dft_refuses_label_smoothing():
    logits, labels = hand_batch()
    with pytest.raises(ValueError, match="no DFT form"):
        token_losses(logits[0], labels[0], "dft", 0.1)


def test_anchored_sft_is_dft_plus_the_kl_term_in_value_and_gradient(tmp_path):
    model, batch = make_peft(), make_batch()
    kl = KLToBase(KLConfig(weight=0.7))
    dft = trainer_for(model, tmp_path, loss="dft")
    anchored = trainer_for(model, tmp_path, loss="dft", penalties=[kl])
    model.train()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    task, outputs = dft.compute_loss(model, dict(batch), return_outputs=True)
    direct = direct_dft(outputs.logits, batch["labels"])
    torch.testing.assert_close(task, direct, rtol=1e-5, atol=1e-7)
    expected = direct + 0.7 * kl.penalty(model, batch, outputs)
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
