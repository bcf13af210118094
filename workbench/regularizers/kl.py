"""KL-to-base: keep the tuned model's next-token distribution close to the base's.

The reference is the same model with the adapter disabled, so no second copy is loaded. The
reference runs the decoder body only; vocabulary-sized log-softmaxes are formed one chunk of
tokens at a time and, under autograd, recomputed in backward (activation checkpointing), so the
term's extra memory is O(chunk_size x vocab) rather than O(batch x seq x vocab).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from .base import Penalty, PenaltyConfig, register
from .lora_delta import unwrap_peft


class KLConfig(PenaltyConfig):
    weight: float = Field(default=0.1, ge=0.0)
    direction: Literal["forward", "reverse"] = "forward"
    temperature: float = Field(default=1.0, gt=0.0)
    warmup_steps: int = Field(default=0, ge=0, description="Ramp the weight linearly from 0.")
    chunk_size: int = Field(default=1024, ge=1, description="Tokens per log-softmax chunk.")


def _chunk_kl(logits: torch.Tensor, ref_hidden: torch.Tensor, ref_head: Callable,
              direction: str, temperature: float) -> torch.Tensor:
    """Summed KL over one chunk. logits: [n, V] tuned; ref_hidden: [n, H] fed to `ref_head`."""
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(ref_head(ref_hidden).float() / temperature, dim=-1)
    if direction == "forward":  # KL(base || tuned)
        return (log_p.exp() * (log_p - log_q)).sum()
    return (log_q.exp() * (log_q - log_p)).sum()  # KL(tuned || base)


def chunked_kl(logits: torch.Tensor, ref_hidden: torch.Tensor, ref_head: Callable,
               mask: torch.Tensor, direction: str = "forward", temperature: float = 1.0,
               chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-token KL over the positions where `mask` is True, and their count.

    logits: [B, T, V] from the tuned model; ref_hidden: [B, T, H], turned into base logits by
    `ref_head` one chunk at a time; mask: [B, T] bool.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    positions = mask.reshape(-1).nonzero().squeeze(1)
    total = logits.new_zeros((), dtype=torch.float32)
    recompute = torch.is_grad_enabled() and logits.requires_grad
    for start in range(0, positions.numel(), chunk_size):
        index = positions[start:start + chunk_size]
        args = (flat_logits.index_select(0, index), flat_hidden.index_select(0, index),
                ref_head, direction, temperature)
        total = total + (checkpoint(_chunk_kl, *args, use_reentrant=False) if recompute
                         else _chunk_kl(*args))
    return total, positions.new_tensor(positions.numel())


@contextlib.contextmanager
def reference_mode(model: torch.nn.Module):
    """The base model: adapter disabled, no grad, eval mode (no NEFTune noise, no dropout)."""
    peft_model = unwrap_peft(model)
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter(), torch.no_grad():
            yield peft_model
    finally:
        peft_model.train(was_training)


def reference_hidden(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, Callable]:
    """Final hidden states of the base model [B, T, H], and the base LM head to apply to them."""
    with reference_mode(model) as peft_model:
        base = peft_model.get_base_model()
        hidden = base.get_decoder()(input_ids=inputs["input_ids"],
                                    attention_mask=inputs.get("attention_mask")).last_hidden_state
    head = base.get_output_embeddings()
    return hidden, getattr(head, "base_layer", head)  # a LoRA-wrapped head: use its base weights


@register
class KLToBase(Penalty):
    name = "kl_to_base"
    Config = KLConfig
    per_token = True

    def weight(self, step: int) -> float:
        ramp = min(1.0, step / self.config.warmup_steps) if self.config.warmup_steps else 1.0
        return self.config.weight * ramp

    def penalty(self, model, inputs, outputs) -> torch.Tensor:
        """Mean KL per completion token (positions whose next-token label is not -100)."""
        hidden, head = reference_hidden(model, inputs)
        mask = inputs["labels"][:, 1:] != -100
        total, count = chunked_kl(outputs.logits[:, :-1], hidden[:, :-1], head, mask,
                                  self.config.direction, self.config.temperature,
                                  self.config.chunk_size)
        return total / count.clamp(min=1)
