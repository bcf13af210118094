"""The LM head apart from the decoder body: the one place that knows what a model's forward does
after its final hidden states, for training and scoring alike.

A 128k vocabulary at 4,096 tokens is 2 GB of fp32 logits per sequence; the decoder's final hidden
states at hidden size 2,048 are 32 MB. So logits are made only where a loss or a score reads them,
a chunk of positions at a time. `hidden_states_out(model)` runs the model's own forward (through
DDP, gradient checkpointing, PEFT, KV caches: every wrapper sees its usual call) with the head
replaced by a pass-through and every post-head step switched off, so `outputs.logits` holds the
final hidden states [B, T, H]. `lm_head(model)` is then the head as a function of hidden states
[n, H] -> logits [n, V]: the output embedding (its LoRA branch included when the head is targeted,
tied or not, or its base weights only with `base=True`) followed by the post-head steps the
model's forward applies, in its order: Cohere multiplies by `logit_scale`, Granite divides by
`logits_scaling`, Gemma 2 and 3 soft-cap (c * tanh(z / c)). `check_head` proves, on the model
itself, that the two give the forward's own logits; an architecture with another step is refused.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from workbench.errors import UsageError
from workbench.modeling.lora import unwrap


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/FSDP/compile wrappers and PEFT."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sharded_head(model: torch.nn.Module) -> bool:
    """Whether FSDP holds the LM head sharded (an FSDP 1 wrapper, or FSDP 2's DTensor weight): its
    weight is then whole only inside the wrapped forward, and applying it outside reads one shard."""
    from torch.distributed.tensor import DTensor

    wrapper = model
    while hasattr(wrapper, "module"):
        if type(wrapper).__name__ == "FullyShardedDataParallel":
            return True
        wrapper = wrapper.module
    head = causal_lm(model).get_output_embeddings()
    return isinstance(getattr(head, "weight", None), DTensor)


def unsupported(model: torch.nn.Module) -> str | None:
    """Why this model's forward cannot stop at the final hidden states, or None when it can."""
    base = causal_lm(model)
    if not (hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")):
        return f"{type(base).__name__} has no get_decoder/get_output_embeddings"
    head = base.get_output_embeddings()
    if head is None or _head_name(base, head) is None:
        return f"{type(base).__name__} has no separate LM head module"
    if sharded_head(model):
        return "FSDP shards the LM head"
    return None


def _head_name(base: torch.nn.Module, head: torch.nn.Module) -> str | None:
    return next((name for name, child in base.named_children() if child is head), None)


def _post_head(lm: torch.nn.Module) -> dict[str, float | None]:
    """The model's post-head steps, read where its forward reads them (a multimodal wrapper's own
    config, not its text config, whose soft-cap its forward does not apply)."""
    scale = getattr(lm, "logit_scale", None)
    return {"scale": scale if isinstance(scale, (int, float)) else None,
            "divisor": getattr(lm.config, "logits_scaling", None),
            "softcap": getattr(lm.config, "final_logit_softcapping", None)}


class Head(torch.nn.Module):
    """The LM head as a function of final hidden states [n, H] -> logits [n, V], as the model's
    forward applies it. `module` is the head itself (a LoRA layer when the head is targeted), so
    adapter switches and scales act on it as on the model."""

    def __init__(self, module: torch.nn.Module, scale: float | None = None, divisor: float | None = None,
                 softcap: float | None = None):
        super().__init__()
        self.module, self.scale, self.divisor, self.softcap = module, scale, divisor, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:  # in the order and dtype of Gemma's forward: the base matches bit for bit
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def lm_head(model: torch.nn.Module, base: bool = False) -> Head:
    """The model's head (`Head`); base: its base weights only (a LoRA-wrapped head's base layer)."""
    lm = causal_lm(model)
    module = lm.get_output_embeddings()
    return Head(getattr(module, "base_layer", module) if base else module, **_post_head(lm))


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
    swapped for a pass-through, every post-head step set to the identity); all restored after."""
    base = causal_lm(model)
    config = base.config
    head = base.get_output_embeddings()
    name = _head_name(base, head)
    identity = [(config, "final_logit_softcapping", None), (config, "logits_scaling", 1.0), (base, "logit_scale", 1.0)]
    changes = [(owner, key, value) for owner, key, value in identity
               if isinstance(getattr(owner, key, None), (int, float))]
    saved = [(owner, key, getattr(owner, key)) for owner, key, _ in changes]
    setattr(base, name, _PassThrough(head))
    for owner, key, value in changes:
        setattr(owner, key, value)
    try:
        yield
    finally:
        setattr(base, name, head)
        for owner, key, value in saved:
            setattr(owner, key, value)


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


@torch.no_grad()
def check_head(model: torch.nn.Module, name: str) -> None:
    """UsageError unless `lm_head` of the forward's final hidden states gives the forward's own
    logits (eval mode, 8 tokens, relative 1e-4: both sides run the same matmuls, so an unlisted
    post-head step, even a 1% scale, shows)."""
    if unsupported(model) is not None:
        return
    was_training = model.training
    model.eval()
    try:
        ids = torch.arange(1, 9, device=causal_lm(model).get_input_embeddings().weight.device)[None]
        logits = model(input_ids=ids).logits.float()
        hidden, _ = final_hidden(model, input_ids=ids)
        ours = lm_head(model)(hidden).float()
    finally:
        model.train(was_training)
    error = ((ours - logits).abs().max() / logits.abs().max().clamp(min=1e-30)).item()
    if not error <= 1e-4:
        raise UsageError(f"model '{name}' ({type(causal_lm(model)).__name__}): its forward changes the logits "
                         f"after the LM head in a way the workbench does not reproduce (relative difference "
                         f"{error:.2g}); train.loss_head: full trains on the model's own logits")
