"""The LM head apart from the decoder body, so that logits are made only where a loss or a score
reads them, a chunk of positions at a time, never as one [batch, seq, vocab] tensor.

A 128k vocabulary at 4,096 tokens is 2 GB of fp32 logits per sequence; the decoder's final hidden
states at hidden size 2,048 are 32 MB. `hidden_states_out(model)` runs the model's own forward
(through DDP, gradient checkpointing, PEFT, KV caches: every wrapper sees its usual call) with the
head replaced by a pass-through, so `outputs.logits` holds the final hidden states [B, T, H].
`lm_head(model)` is then the head as a function of hidden states [n, H] -> logits [n, V]: the
model's output embedding (with its LoRA branch when the head is targeted, tied or not) followed by
the model's logit soft-capping (`config.final_logit_softcapping`, Gemma 2) where it has one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from peft import PeftModel

SCALED_LOGITS = ("logit_scale", "logits_scaling")  # Cohere, Granite: their forward rescales the logits


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/compile wrappers and PEFT."""
    while not isinstance(model, PeftModel) and hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if isinstance(model, PeftModel) else model


def unsupported(model: torch.nn.Module) -> str | None:
    """Why this model's forward cannot stop at the final hidden states, or None when it can.

    Models whose forward does more to the logits than the head and a soft-cap (a logit scale)
    and models without `get_decoder`/`get_output_embeddings` are refused; so is a head that FSDP
    shards (FSDP 1 wrapper or a DTensor weight): its weight is whole only inside the wrapped
    forward, so applying it chunk by chunk outside would read one shard."""
    from torch.distributed.tensor import DTensor

    wrapper = model
    while hasattr(wrapper, "module") and not isinstance(wrapper, PeftModel):
        if type(wrapper).__name__ == "FullyShardedDataParallel":
            return "FSDP shards the LM head"
        wrapper = wrapper.module
    base = causal_lm(model)
    if not (hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")):
        return f"{type(base).__name__} has no get_decoder/get_output_embeddings"
    head = base.get_output_embeddings()
    if head is None or _head_name(base, head) is None:
        return f"{type(base).__name__} has no separate LM head module"
    if isinstance(getattr(head, "weight", None), DTensor):
        return "FSDP shards the LM head"
    scaled = [k for k in SCALED_LOGITS if getattr(base.config, k, None) not in (None, 1, 1.0)]
    if scaled:
        return f"{type(base).__name__} rescales its logits ({scaled[0]})"
    return None


def _head_name(base: torch.nn.Module, head: torch.nn.Module) -> str | None:
    return next((name for name, child in base.named_children() if child is head), None)


class Head(torch.nn.Module):
    """The model's LM head as a function of final hidden states [n, H] -> logits [n, V], soft-capped
    as the model's forward does (cap * tanh(logits / cap)). `module` is the head itself (a LoRA
    layer when the head is targeted), so adapter switches and scales act on it as on the model."""

    def __init__(self, module: torch.nn.Module, softcap: float | None):
        super().__init__()
        self.module, self.softcap = module, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def lm_head(model: torch.nn.Module) -> Head:
    base = causal_lm(model)
    return Head(base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None))


class _PassThrough(torch.nn.Module):
    """Stands in for the head during the forward: returns the hidden states. The head's trainable
    parameters enter the output times 0, so that DDP's search for unused parameters (on unless
    gradient checkpointing is) finds them in the graph; their gradient arrives through the chunked
    head in the same backward, summed with this zero before their hooks fire once."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.trainable = [p for p in head.parameters() if p.requires_grad]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not (self.trainable and torch.is_grad_enabled()):
            return hidden
        return hidden + sum(p.reshape(-1)[0] for p in self.trainable).to(hidden.dtype) * 0


@contextlib.contextmanager
def hidden_states_out(model: torch.nn.Module) -> Iterator[None]:
    """Within: the model's forward returns the final hidden states [B, T, H] as `logits` (the head
    swapped for a pass-through, soft-capping off); the head and the config restored after."""
    base = causal_lm(model)
    head = base.get_output_embeddings()
    name = _head_name(base, head)
    cap = getattr(base.config, "final_logit_softcapping", None)
    setattr(base, name, _PassThrough(head))
    if cap is not None:
        base.config.final_logit_softcapping = None
    try:
        yield
    finally:
        setattr(base, name, head)
        if cap is not None:
            base.config.final_logit_softcapping = cap


def final_hidden(model: torch.nn.Module, **inputs) -> tuple[torch.Tensor, object]:
    """(final hidden states [B, T, H], the rest of the model's outputs, e.g. its KV cache)."""
    with hidden_states_out(model):
        outputs = model(**inputs)
    return outputs.logits, outputs


def logits_at(model: torch.nn.Module, **inputs) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Any]:
    """(at, outputs) of one forward: at(rows, cols) -> the fp32 logits [n, V] at those positions,
    made from the final hidden states through the head (only those positions are projected), or
    taken from the model's whole logits where its forward cannot stop early (`unsupported`)."""
    if unsupported(model) is not None:
        outputs = model(**inputs)
        return (lambda rows, cols: outputs.logits[rows, cols].float()), outputs
    hidden, outputs = final_hidden(model, **inputs)
    head = lm_head(model)
    return (lambda rows, cols: head(hidden[rows, cols]).float()), outputs
