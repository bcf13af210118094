"""What tests share: the repository root (every path resolves from it, whatever the working
directory), a tiny PEFT model, a token batch, and the adapter comparison. Fixtures are in
conftest.py; this is a plain module that tests import."""

from pathlib import Path

import pytest
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


def per_token_value(term_of, model, batch, fused=True, chunk_size=4):
    """A per-token term's mean per completion token on `batch`, computed as the trainer computes it:
    the model's forward (to its final hidden states when fused, else its logits), then the loss
    engine. term_of(base) -> the term, base() giving the base's side of the batch. Differentiable."""
    import contextlib
    import functools

    from workbench.modeling.head import hidden_states_out, lm_head
    from workbench.scoring.masks import next_token_mask
    from workbench.training.engine import base_reference, chunked_loss

    model.train()
    with hidden_states_out(model) if fused else contextlib.nullcontext():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = next_token_mask(batch["labels"])
    base = functools.cache(lambda: base_reference(model, batch, fused))
    loss, _ = chunked_loss(outputs.logits, lm_head(model) if fused else None, mask, [term_of(base)], [1.0], chunk_size)
    return loss / mask.sum()


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


def adapter_difference(a: dict, b: dict) -> float:
    """How far adapter b is from a, relative to a's scale: max |b - a| over every element of the
    lora_A tensors over max |a| of those, the same for lora_B, and the larger of the two.

    Relative to the adapter's scale, not per element or per tensor: rounding is relative to the
    magnitudes summed, so an element near zero, or a whole small tensor (after 4 steps on the tiny
    recipe the q/k lora_B reach ~6% of the largest lora_B), carries the same absolute rounding as
    the largest. A and B apart: A keeps its random initialisation and moves little, B starts at 0,
    so B is all update.
    """
    assert a.keys() == b.keys()
    worst = 0.0
    for part in ("lora_A", "lora_B"):
        keys = [k for k in a if part in k]
        assert keys, part
        scale = max(a[k].abs().max().item() for k in keys)
        worst = max(worst, max((b[k] - a[k]).abs().max().item() for k in keys) / scale)
    return worst


def assert_adapters_equal(a: dict, b: dict, tol: float) -> float:
    """`adapter_difference(a, b) <= tol`; returns the difference."""
    difference = adapter_difference(a, b)
    assert difference <= tol, f"adapters differ by {difference:.3g} of their scale (tolerance {tol:g})"
    return difference


def logged_terms(run: dict) -> list[dict]:
    """run.json's training-step records, only the loss terms: loss, task_loss, each penalty and
    `<penalty>_weighted`."""
    names = {"loss", "task_loss", *run["penalties"], *(f"{p}_weighted" for p in run["penalties"])}
    return [{k: v for k, v in h.items() if k in names} for h in run["history"] if "task_loss" in h]


def assert_terms_equal(a: dict, b: dict, tol: float, names=None) -> dict[str, float]:
    """Every logged term (or those named) of run b equals run a's at every step, to tol times the term's largest
    value in run a. Relative to the term's scale, not to each value: the KL (~0.01 to 0.05 here)
    is a difference of two ~5-nat cross-entropies and carries their rounding, so per value it is
    ~100x noisier than the task loss. Returns the differences."""
    steps_a, steps_b = logged_terms(a), logged_terms(b)
    assert len(steps_a) == len(steps_b) > 0 and steps_a[0].keys() == steps_b[0].keys()
    differences = {}
    for name in names or steps_a[0]:
        scale = max(abs(h[name]) for h in steps_a) or 1.0  # all zero: compare absolutely
        differences[name] = max(abs(x[name] - y[name]) for x, y in zip(steps_a, steps_b)) / scale
    bad = {name: f"{d:.3g}" for name, d in differences.items() if d > tol}
    assert not bad, f"logged terms differ by these fractions of their scale (tolerance {tol:g}): {bad}"
    return differences


def assert_loss_is_the_sum_of_terms(run: dict, rtol: float = 1e-6) -> None:
    """At every logged step `loss` (the Trainer's, averaged over ranks) = task_loss + the sum of
    the `*_weighted` terms, as the trainer's log() reduces them the same way."""
    for h in logged_terms(run):
        total = h["task_loss"] + sum(v for k, v in h.items() if k.endswith("_weighted"))
        assert total == pytest.approx(h["loss"], rel=rtol), h


def signal_at_step(step: int, signum: int, rank: str | None = None) -> None:
    """For a child process that plays a fault: every trainer `workbench train` builds from now on
    sends this process `signum` at the end of optimiser step `step` (only on data-parallel rank
    `rank`, as $RANK names it, when given)."""
    import os

    from transformers import TrainerCallback

    import workbench.training.run as run

    class SignalAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step and (rank is None or os.environ.get("RANK") == rank):
                os.kill(os.getpid(), signum)

    build = run.build_trainer

    def with_signal(*args, **kwargs):
        trainer, record = build(*args, **kwargs)
        trainer.add_callback(SignalAt())
        return trainer, record

    run.build_trainer = with_signal
