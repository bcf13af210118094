import pytest
import torch

from tests.helpers import make_peft, per_token_value
from workbench.data.examples import EXAMPLE_INDEX, Collator
from workbench.training.reference import TopKReference, build_topk_reference, topk_reference_for
from workbench.training.regularizers.kl import KLConfig, KLToBase

VOCAB = 259


def examples(lengths=(10, 7, 12, 9), prompt=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * prompt + ids[prompt:],
                    EXAMPLE_INDEX: i})
    return out


def penalties(model, batch, top_k, temperature=1.0):
    """(cached, exact) KL-to-base on one batch, the cache built with the adapter on (it must switch it off)."""
    collator = Collator(0)
    reference = TopKReference(**build_topk_reference(model, examples(), collator, top_k, temperature, batch_size=3))
    config = dict(weight=1.0, temperature=temperature)
    cached = KLToBase(KLConfig(reference="topk_cache", top_k=top_k, **config), reference_cache=reference)
    exact = KLToBase(KLConfig(**config))
    return tuple(per_token_value(lambda base, p=p: p.term(model, batch, base), model, batch, fused=False, chunk_size=5)
                 for p in (cached, exact))


def test_full_vocabulary_cache_gives_the_exact_penalty_in_any_batch_order():
    model = make_peft(perturb=True)
    batch = Collator(0)([examples()[i] for i in (2, 0, 3)])
    cached, exact = penalties(model, batch, top_k=VOCAB, temperature=1.5)
    assert exact.item() > 1e-4
    torch.testing.assert_close(cached, exact, rtol=1e-5, atol=1e-7)


def test_smaller_caches_give_smaller_lower_bounds():
    """The tail lumped into one outcome coarsens the distribution: by the data-processing
    inequality the KL can only drop, and less so the more tokens are kept (nested partitions)."""
    model = make_peft(perturb=True)
    batch = Collator(0)([examples()[i] for i in (1, 3)])
    values = [penalties(model, batch, top_k=k)[0].item() for k in (4, 16, 64, VOCAB)]
    exact = penalties(model, batch, top_k=VOCAB)[1].item()
    assert 0 < values[0] < values[1] < values[2] < values[3] == pytest.approx(exact, rel=1e-5)


def test_reference_rows_follow_each_examples_completion_positions():
    data = examples()
    reference = TopKReference(**build_topk_reference(make_peft(perturb=False), data, Collator(0), 4, 1.0))
    counts = [sum(label != -100 for label in ex["labels"][1:]) for ex in data]
    assert reference.offsets == [0] + torch.tensor(counts).cumsum(0).tolist()
    values, ids = reference.lookup(torch.tensor([3, 1]), "cpu")
    assert values.shape == ids.shape == (counts[3] + counts[1], 4)
    assert (values[:, :-1] >= values[:, 1:]).all()  # each row in decreasing order


def test_cache_is_computed_once_per_base_data_and_k(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    model, data = make_peft(perturb=False), examples()
    _, first = topk_reference_for(model, data, Collator(0), "base-a", 8, 1.0)
    _, second = topk_reference_for(model, data, Collator(0), "base-a", 8, 1.0)
    _, other_k = topk_reference_for(model, data, Collator(0), "base-a", 4, 1.0)
    assert (first["cached"], second["cached"], other_k["cached"]) == (False, True, False)
    assert first["path"] == second["path"] != other_k["path"]


def test_reverse_kl_with_a_cache_is_refused():
    with pytest.raises(ValueError, match="forward only"):
        KLConfig(reference="topk_cache", direction="reverse")
