import pytest
import torch
import torch.nn.functional as F

from tests.helpers import make_batch, make_peft, per_token_value
from workbench.modeling.lora import adapter_scale
from workbench.scoring.topk_kl import base_topk, kl_bounds
from workbench.training.engine import chunked_loss
from workbench.training.regularizers.kl import KLConfig, KLToBase
from workbench.training.terms import kl_term, topk_kl_term


def chunked_kl(logits, ref, head, mask, direction="forward", temperature=1.0, chunk_size=1024):
    """The KL summed over the mask, through the loss engine over whole logits, and the count."""
    total, _ = chunked_loss(logits, None, mask, [kl_term(ref, head, direction, temperature)], [1.0], chunk_size)
    return total, mask.sum()


def cached_topk_kl(logits, values, ids, mask, temperature=1.0, chunk_size=1024):
    total, _ = chunked_loss(logits, None, mask, [topk_kl_term(values, ids, temperature)], [1.0], chunk_size)
    return total, mask.sum()


def reference_kl(logits, ref_logits, mask, direction, temperature):
    """torch's kl_div on the full tensors, summed over the masked positions."""
    log_q = F.log_softmax(logits / temperature, -1)
    log_p = F.log_softmax(ref_logits / temperature, -1)
    if direction == "forward":
        per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    else:
        per_token = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    return per_token[mask].sum()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_chunked_kl_matches_kl_div_value_and_gradient(direction, temperature, chunk_size):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=gen).requires_grad_()
    ref = torch.randn(3, 7, 50, generator=gen) * 2
    mask = torch.rand(3, 7, generator=gen) > 0.4
    ours, count = chunked_kl(logits, ref, lambda h: h, mask, direction, temperature, chunk_size)
    theirs = reference_kl(logits, ref, mask, direction, temperature)
    assert count.item() == mask.sum().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)  # fp32 precision
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)
    assert g_ours[~mask].abs().max() == 0  # masked positions get no gradient


def test_chunked_kl_applies_reference_head_per_chunk():
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(6, 30, bias=False).double()
    hidden = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    logits = torch.randn(2, 5, 30, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    ours, _ = chunked_kl(logits, hidden, head, mask, chunk_size=3)
    theirs = reference_kl(logits, head(hidden).detach(), mask, "forward", 1.0)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-7)


def test_upstream_gradient_scales_the_handed_on_gradient():
    """backward multiplies the precomputed gradient by the upstream gradient (the penalty weight)."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 10, generator=gen).requires_grad_()
    ref = torch.randn(2, 4, 10, generator=gen)
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    total, _ = chunked_kl(logits, ref, lambda h: h, mask, chunk_size=2)
    (-3.0 * total).backward()
    (expected,) = torch.autograd.grad(-3.0 * reference_kl(logits, ref, mask, "forward", 1.0), logits)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_all_masked_batch_is_zero():
    logits = torch.randn(2, 4, 10, requires_grad=True)
    total, count = chunked_kl(logits, torch.randn(2, 4, 10), lambda h: h, torch.zeros(2, 4, dtype=torch.bool))
    assert total.item() == 0 and count.item() == 0


def _penalty(model, batch, fused=True, chunk_size=4, **cfg):
    penalty = KLToBase(KLConfig(weight=1.0, **cfg))
    return per_token_value(lambda base: penalty.term(model, batch, base), model, batch, fused, chunk_size)


def test_penalty_is_zero_before_any_update():
    model, batch = make_peft(perturb=False), make_batch()
    assert _penalty(model, batch).item() == 0.0


def test_penalty_is_zero_at_adapter_scale_zero():
    model, batch = make_peft(perturb=True), make_batch()
    assert _penalty(model, batch).item() > 1e-6
    with adapter_scale(model, 0.0):
        assert _penalty(model, batch).item() == 0.0


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_penalty_equals_two_forward_passes(direction, fused):
    """Against the obvious implementation: full logits with and without the adapter; the engine
    over final hidden states (fused) and over the model's logits alike."""
    model, batch = make_peft(targets=("q_proj", "v_proj", "lm_head"), perturb=True), make_batch()
    value = _penalty(model, batch, fused, direction=direction, temperature=1.5, chunk_size=4)
    with torch.no_grad():
        tuned = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    expected = reference_kl(tuned[:, :-1], base[:, :-1], mask, direction, 1.5) / mask.sum()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_penalty_gradient_matches_autograd_through_kl_div(direction, fused):
    """The closed-form gradient handed to the logits, taken on to every LoRA parameter (the head's
    included), against autograd through the obvious full-tensor implementation."""
    model, batch = make_peft(targets=("q_proj", "v_proj", "lm_head"), perturb=True), make_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(_penalty(model, batch, fused, direction=direction, temperature=0.7, chunk_size=3),
                               params)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs).logits
    mask = batch["labels"][:, 1:] != -100
    reference = reference_kl(model(**inputs).logits[:, :-1], base[:, :-1], mask, direction, 0.7) / mask.sum()
    theirs = torch.autograd.grad(reference, params)
    assert sum(g.abs().sum() for g in theirs) > 0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_warmup_ramps_weight_linearly():
    penalty = KLToBase(KLConfig(weight=0.8, warmup_steps=4))
    assert [penalty.weight(s) for s in (0, 2, 4, 100)] == [0.0, 0.4, 0.8, 0.8]


def lumped_tail_kl(logits, values, ids, mask, temperature):
    """The top-k cache's KL written the obvious way, for autograd: the base's tail as one outcome."""
    log_q = F.log_softmax(logits[mask] / temperature, -1)
    q_head = log_q.gather(-1, ids).exp()
    p = values.exp()
    mass, q_tail = 1 - p.sum(-1), 1 - q_head.sum(-1)
    return ((p * (values - log_q.gather(-1, ids))).sum(-1) + mass * (mass.log() - q_tail.log())).sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_topk_kl_is_the_lumped_tail_kl_with_its_gradient(temperature):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 40, generator=gen, dtype=torch.float64).requires_grad_()
    ref = torch.randn(2, 6, 40, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(2, 6, generator=gen) > 0.3
    values, ids = base_topk(F.log_softmax(ref[mask] / temperature, -1), 7)
    ours, count = cached_topk_kl(logits, values, ids, mask, temperature, chunk_size=4)
    theirs = lumped_tail_kl(logits, values, ids, mask, temperature)
    lower, _ = kl_bounds(values, ids, F.log_softmax(logits[mask].detach() / temperature, -1))
    assert count.item() == mask.sum().item()
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.double(), lower.sum(), rtol=1e-5, atol=1e-6)  # the eval's lower bound
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)


def test_cached_topk_kl_with_the_whole_vocabulary_is_the_exact_kl():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 30, generator=gen).requires_grad_()
    ref = torch.randn(2, 5, 30, generator=gen)
    mask = torch.rand(2, 5, generator=gen) > 0.3
    values, ids = base_topk(F.log_softmax(ref[mask], -1), 30)
    ours, _ = cached_topk_kl(logits, values, ids, mask)
    exact, _ = chunked_kl(logits, ref, lambda h: h, mask)
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-6)
    g_ours, g_exact = (torch.autograd.grad(v, logits)[0] for v in (ours, exact))
    torch.testing.assert_close(g_ours, g_exact, rtol=1e-5, atol=1e-6)


def test_cached_reference_of_the_wrong_length_is_refused():
    class Cache:
        def lookup(self, index, device):
            return torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long)

    batch = make_batch(batch=1, seq=6, prompt=1)  # labels at 1 and 2 (3 to 5 are padding): 2 positions
    batch["index"] = torch.tensor([0])
    penalty = KLToBase(KLConfig(weight=1.0, reference="topk_cache"), reference_cache=Cache())
    with pytest.raises(ValueError, match="3 positions for this batch, the batch 2"):
        penalty.term(None, batch, lambda: None)
