import pytest
import torch
import torch.nn.functional as F

from workbench.regularizers.closed_form import smoothed_cross_entropy


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_smoothed_cross_entropy_matches_torch_value_and_gradient(epsilon, chunk_size):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 7, 40, generator=gen)).requires_grad_()
    labels = torch.randint(0, 40, (2, 7), generator=gen)
    labels[0, :3] = -100
    labels[1, -2:] = -100
    ours, count = smoothed_cross_entropy(logits, labels.reshape(-1), epsilon, chunk_size)
    theirs = F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1), ignore_index=-100,
                             label_smoothing=epsilon, reduction="sum")
    assert count.item() == (labels != -100).sum().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(2.5 * ours, logits)
    (g_theirs,) = torch.autograd.grad(2.5 * theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)
    assert g_ours[labels == -100].abs().max() == 0  # unlabelled positions get no gradient


def test_smoothed_cross_entropy_without_grad_allocates_no_gradient():
    logits = torch.randn(3, 10)
    total, count = smoothed_cross_entropy(logits, torch.tensor([1, -100, 4]), 0.1)
    assert not total.requires_grad and count.item() == 2
