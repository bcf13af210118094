"""What tests share: the repository root (every path resolves from it, whatever the working
directory), a tiny PEFT model, a token batch, and the adapter comparison. Fixtures are in
conftest.py; this is a plain module that tests import."""

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from workbench.modeling.tiny import tiny_model

REPO = Path(__file__).resolve().parents[1]


def repo(path: str) -> str:
    """A repository path (recipes/tiny.yaml) as an absolute path string, for CLI arguments."""
    return str(REPO / path)


def make_peft(targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=8.0, seed=0, perturb=True):
    """A tiny random Llama with LoRA; `perturb` gives B nonzero values so dW != 0."""
    model = tiny_model(vocab_size=259, hidden_size=32, intermediate_size=48, seed=seed)
    torch.manual_seed(seed)  # LoRA A is drawn from the global generator
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=gen) * 0.1
    return peft_model


def make_batch(batch=3, seq=10, vocab=259, seed=0, prompt=4):
    """Random token batch; labels masked on a prompt prefix and on right padding of row 0."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def assert_adapters_match(a: dict, b: dict, rtol: float, atol: float, norm_tol: float, min_close: float = 0.99):
    """Adapter tensors equal up to float noise, judged per tensor and per element.

    Different summation orders (micro-batches, processes) are float noise, but Adam's normalised
    step can turn that noise into a whole learning-rate step for an element whose gradient is
    near zero, which later steps spread. So: the tensor as a whole within norm_tol (relative),
    and a min_close fraction of elements close.
    A wrong penalty scale moves many elements at once and fails both.
    """
    assert a.keys() == b.keys()
    for key in a:
        assert (b[key] - a[key]).norm() <= norm_tol * a[key].norm(), key
        close = torch.isclose(b[key], a[key], rtol=rtol, atol=atol)
        assert close.float().mean() >= min_close, key
