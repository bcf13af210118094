"""KL-to-base: keep the tuned model's next-token distribution close to the base's.

The reference is the same model with the adapter disabled, so no second copy is loaded. The
reference runs the decoder body only; the base LM head and both vocabulary-sized log-softmaxes are
applied one chunk of tokens at a time, and each chunk's gradient with respect to the tuned logits
is written, in closed form, into one buffer shaped like the logits, which backward hands on. So
the term's extra memory is that one gradient (which the task loss's backward allocates anyway)
plus O(chunk_size x vocab), and nothing is recomputed in backward.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.autograd.function import once_differentiable

from .base import Penalty, PenaltyConfig, register
from .lora_delta import unwrap_peft


class KLConfig(PenaltyConfig):
    weight: float = Field(default=0.1, ge=0.0)
    direction: Literal["forward", "reverse"] = "forward"
    temperature: float = Field(default=1.0, gt=0.0)
    warmup_steps: int = Field(default=0, ge=0, description="Ramp the weight linearly from 0.")
    chunk_size: int = Field(default=1024, ge=1, description="Tokens per log-softmax chunk.")


class _ChunkedKL(torch.autograd.Function):
    """Sum over `positions` of KL between softmax(ref_head(ref_hidden) / t) and softmax(logits / t).

    With q = softmax(z / t) the tuned distribution and p the base's, the gradient with respect to
    the tuned logits z of one position's KL is
      forward, KL(p || q):  (q - p) / t
      reverse, KL(q || p):  q * (log q - log p - KL(q || p)) / t
    """

    @staticmethod
    def forward(ctx, logits, ref_hidden, positions, ref_head, direction, temperature, chunk_size, want_grad):
        flat = logits.reshape(-1, logits.shape[-1])
        hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])
        grad = torch.zeros_like(flat) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, positions.numel(), chunk_size):
            index = positions[start:start + chunk_size]
            log_q = F.log_softmax(flat.index_select(0, index).float().div_(temperature), dim=-1)
            log_p = F.log_softmax(ref_head(hidden.index_select(0, index)).float().div_(temperature), dim=-1)
            if direction == "forward":
                p = log_p.exp()
                total += (p * (log_p - log_q)).sum()
                if want_grad:
                    grad.index_copy_(0, index, log_q.exp_().sub_(p).div_(temperature).to(grad.dtype))
            else:
                q = log_q.exp()
                log_ratio = log_q.sub_(log_p)
                kl = (q * log_ratio).sum(-1, keepdim=True)
                total += kl.sum()
                if want_grad:
                    grad.index_copy_(0, index, log_ratio.sub_(kl).mul_(q).div_(temperature).to(grad.dtype))
        ctx.grad, ctx.shape = grad, logits.shape
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        grad, ctx.grad = ctx.grad, None  # handed on, not copied: backward runs once
        return grad.mul_(grad_total.to(grad.dtype)).view(ctx.shape), None, None, None, None, None, None, None


def chunked_kl(logits: torch.Tensor, ref_hidden: torch.Tensor, ref_head: Callable,
               mask: torch.Tensor, direction: str = "forward", temperature: float = 1.0,
               chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-token KL over the positions where `mask` is True, and their count.

    logits: [B, T, V] from the tuned model; ref_hidden: [B, T, H], turned into base logits by
    `ref_head` one chunk at a time; mask: [B, T] bool. Pass the whole logits tensor, not a slice
    of it: the gradient is then handed to it without a copy.
    """
    positions = mask.reshape(-1).nonzero().squeeze(1)
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    total = _ChunkedKL.apply(logits, ref_hidden, positions, ref_head, direction, temperature, chunk_size,
                             want_grad)
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
        """Mean KL per completion token: positions t whose next-token label (t + 1) is not -100."""
        hidden, head = reference_hidden(model, inputs)
        mask = F.pad(inputs["labels"][:, 1:] != -100, (0, 1), value=False)  # [B, T]: logits predict t + 1
        total, count = chunked_kl(outputs.logits, hidden, head, mask, self.config.direction,
                                  self.config.temperature, self.config.chunk_size)
        return total / count.clamp(min=1)
