import pytest
import torch
import torch.nn.functional as F

from tests.helpers import make_peft
from workbench.errors import UsageError
from workbench.training.fisher import check_fisher, estimate_fisher, load_fisher, save_fisher
from workbench.modeling.lora import lora_factors


def examples(n=6, seq=9, vocab=259, seed=0):
    """Variable-length examples, every token a label (general text)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = seq - (i % 3)
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": list(ids)})
    return out


def collate(batch):
    width = max(len(e["input_ids"]) for e in batch)
    pad = lambda key, value: torch.tensor([e[key] + [value] * (width - len(e[key])) for e in batch])
    return {"input_ids": pad("input_ids", 0), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100)}


def base_layers(model):
    modules = dict(model.named_modules())
    return {f.key: modules["base_model.model." + f.key].base_layer for f in lora_factors(model)}


def per_example_loss(model, example):
    batch = collate([example])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:])


def test_diag_fisher_equals_naive_per_example_squared_gradients():
    model, data = make_peft(), examples()
    fisher = estimate_fisher(model, data, collate, "diag", batch_size=4)
    layers = base_layers(model)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    naive = {key: torch.zeros_like(layer.weight) for key, layer in layers.items()}
    with model.disable_adapter():
        for example in data:
            grads = torch.autograd.grad(per_example_loss(model, example),
                                        [layer.weight for layer in layers.values()])
            for key, grad in zip(layers, grads):
                naive[key] += grad**2 / len(data)
    for key in layers:
        torch.testing.assert_close(fisher[f"{key}.diag"], naive[key], rtol=1e-4, atol=1e-10)


def test_kfac_factors_equal_naive_per_example_computation():
    model, data = make_peft(), examples()
    fisher = estimate_fisher(model, data, collate, "kfac_diag", batch_size=4)
    layers = base_layers(model)
    G = {key: 0.0 for key in layers}
    A = {key: 0.0 for key in layers}
    n_tokens = sum(len(e["input_ids"]) for e in data)
    with model.disable_adapter():
        for example in data:
            captured = {}
            hooks = [layer.register_forward_hook(lambda m, a, o, k=key: captured.__setitem__(k, (a[0], o)))
                     for key, layer in layers.items()]
            with torch.enable_grad():
                model.get_input_embeddings().weight.requires_grad_(True)
                loss = per_example_loss(model, example)
                model.get_input_embeddings().weight.requires_grad_(False)
            for hook in hooks:
                hook.remove()
            outs = [captured[k][1] for k in layers]
            grads = torch.autograd.grad(loss, outs)
            for key, grad in zip(layers, grads):
                G[key] = G[key] + (grad**2).sum((0, 1)) / len(data)
                A[key] = A[key] + (captured[key][0].detach() ** 2).sum((0, 1)) / n_tokens
    for key in layers:
        torch.testing.assert_close(fisher[f"{key}.g"], G[key], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(fisher[f"{key}.a"], A[key], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("estimator", ["kfac_diag", "diag"])
def test_fisher_does_not_depend_on_batch_size(estimator):
    """Per-example gradients: squaring a batch mean instead would shrink F as batches grow."""
    model, data = make_peft(), examples()
    one = estimate_fisher(model, data, collate, estimator, batch_size=1)
    six = estimate_fisher(model, data, collate, estimator, batch_size=6)
    for key in one:
        torch.testing.assert_close(one[key], six[key], rtol=1e-4, atol=1e-10)


def test_estimation_leaves_the_model_untouched():
    model = make_peft()
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.train()
    estimate_fisher(model, examples(), collate, "kfac_diag")
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_kfac_approximates_the_exact_diagonal():
    """Not equal (it factorises), but strongly correlated on the same data."""
    model, data = make_peft(), examples(n=12)
    kfac = estimate_fisher(model, data, collate, "kfac_diag")
    diag = estimate_fisher(model, data, collate, "diag")
    key = next(iter(base_layers(model)))
    approx = torch.outer(kfac[f"{key}.g"], kfac[f"{key}.a"]).flatten()
    exact = diag[f"{key}.diag"].flatten()
    corr = torch.corrcoef(torch.stack([approx.log(), exact.log()]))[0, 1]
    assert corr > 0.5


def test_save_load_round_trip_and_checks(tmp_path):
    model = make_peft()
    fisher = estimate_fisher(model, examples(), collate, "kfac_diag")
    path = save_fisher(tmp_path / "f.safetensors", fisher, {"model_fingerprint": "abc", "estimator": "kfac_diag"})
    loaded, meta = load_fisher(path, model, "abc")
    assert meta["estimator"] == "kfac_diag" and loaded.keys() == fisher.keys()
    with pytest.raises(UsageError, match="another base model"):
        load_fisher(path, model, "other")
    with pytest.raises(UsageError, match="no Fisher for LoRA module"):
        check_fisher(fisher, make_peft(targets=("k_proj",)), path)
    bad = dict(fisher)
    key = next(k for k in bad if k.endswith(".a"))
    bad[key] = bad[key][:-1]
    with pytest.raises(UsageError, match="shape"):
        check_fisher(bad, model, path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="not a readable"):
        load_fisher(tmp_path / "junk.safetensors", model)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
