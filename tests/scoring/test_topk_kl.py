import itertools
import math

import pytest
import torch

from workbench.scoring.topk_kl import base_topk, kl_bounds


def exact_kl(base_lp, tuned_lp):
    return torch.nn.functional.kl_div(tuned_lp.double(), base_lp.double(), log_target=True,
                                      reduction="none").sum(-1)


def distributions(n=16, vocab=50, seed=0, sharp=3.0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.log_softmax(torch.randn(n, vocab, generator=gen) * sharp, -1)
    tuned = torch.log_softmax(base + torch.randn(n, vocab, generator=gen), -1)
    return base, tuned


@pytest.mark.parametrize("k", [1, 5, 20, 49])
def test_bounds_bracket_the_exact_kl(k):
    base, tuned = distributions()
    lower, upper = kl_bounds(*base_topk(base, k), tuned)
    exact = exact_kl(base, tuned)
    # the inputs are fp32 log-softmaxes, whose probabilities sum to 1 only to ~1e-7
    assert (lower <= exact + 1e-6).all() and (exact <= upper + 1e-6).all()
    assert (lower >= -1e-6).all()


def test_full_vocabulary_is_exact():
    base, tuned = distributions()
    lower, upper = kl_bounds(*base_topk(base, 50), tuned)
    torch.testing.assert_close(lower, exact_kl(base, tuned))
    torch.testing.assert_close(upper, lower)


def test_bounds_tighten_with_k():
    base, tuned = distributions(seed=1)
    gaps = [(u - l).mean().item() for l, u in (kl_bounds(*base_topk(base, k), tuned) for k in (2, 10, 30, 50))]
    assert all(a >= b for a, b in itertools.pairwise(gaps)) and gaps[-1] == 0.0


def test_identical_models_give_zero():
    base, _ = distributions()
    lower, upper = kl_bounds(*base_topk(base, 50), base)
    assert lower.abs().max() < 1e-12 and upper.abs().max() < 1e-12


def test_upper_bound_is_attained_by_the_worst_tail():
    # vocab 4, k = 2: base head p = (0.4, 0.3), tail mass 0.3 with each tail prob <= 0.3.
    # The worst tail puts all 0.3 on the token the tuned model finds least likely.
    base = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    tuned = torch.tensor([[0.25, 0.25, 0.45, 0.05]]).log()
    lower, upper = kl_bounds(*base_topk(base, 2), tuned)
    head = 0.4 * torch.log(torch.tensor(0.4 / 0.25)) + 0.3 * torch.log(torch.tensor(0.3 / 0.25))
    worst = 0.4 * math.log(0.4 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.3 * math.log(0.3 / 0.05)
    assert upper.item() == pytest.approx(worst, rel=1e-6)
    assert lower.item() == pytest.approx((head + 0.3 * torch.log(torch.tensor(0.3 / 0.5))).item(), rel=1e-6)


def brute_force_upper(base_lp, tuned_lp, k, most_likely_first=False):
    """The worst tail by hand: per token, sort the tuned tail ascending and fill it with the cap
    p_k, the remainder on the next token."""
    out = []
    for b, t in zip(base_lp.double(), tuned_lp.double()):
        values, ids = b.topk(k)
        p = values.exp()
        head = float((p * (values - t[ids])).sum())
        mass, cap = max(1.0 - float(p.sum()), 0.0), float(p[-1])
        tail = sorted((float(x) for i, x in enumerate(t) if i not in set(ids.tolist())), reverse=most_likely_first)
        total = 0.0
        for log_q in tail:
            x = min(cap, mass)
            if x <= 0:
                break
            total += x * (math.log(x) - log_q)
            mass -= x
        out.append(head + total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("sharp", [0.5, 3.0])
def test_upper_bound_matches_a_brute_force_fill(sharp):
    """Flat (sharp 0.5: a big tail filled over many tokens) and peaked distributions."""
    base, tuned = distributions(n=6, vocab=400, seed=3, sharp=sharp)
    _, upper = kl_bounds(*base_topk(base, 8), tuned)
    torch.testing.assert_close(upper, brute_force_upper(base, tuned, 8), rtol=1e-9, atol=1e-9)
    # negative control: filling the tuned model's most likely tail tokens first is a different,
    # smaller number, which the tolerance tells apart
    assert (brute_force_upper(base, tuned, 8, most_likely_first=True) < upper - 1e-3).all()
