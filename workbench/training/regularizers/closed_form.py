"""Vocabulary-sized terms whose gradient with respect to the logits has a closed form: the value
and the gradient are computed together, a chunk of positions at a time, the gradient written into
one buffer shaped like the logits, which backward scales and hands on. Nothing vocabulary-sized
is kept per chunk, nothing is recomputed, and no zero-filled gradient is made per chunk or slice.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable


class _HandedOnGradient(torch.autograd.Function):
    """A scalar of the logits whose gradient `compute` works out alongside its value, chunk by
    chunk into one logits-shaped buffer; backward scales that buffer and hands it on."""

    @staticmethod
    def forward(ctx, logits, compute, want_grad):
        total, ctx.grad = compute(logits, want_grad)
        ctx.shape = logits.shape
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        grad, ctx.grad = ctx.grad, None  # handed on, not copied: backward runs once
        # times the fp32 scalar as it is: a loss scale cast to fp16 first (65,536) would be inf
        return grad.mul_(grad_total).view(ctx.shape), None, None


def summed_by_chunk(logits: torch.Tensor, positions: torch.Tensor, chunk_size: int,
                    chunk_fn: Callable) -> torch.Tensor:
    """Sum over chunks of `positions` (flat row indices of the logits) of
    `chunk_fn(z, start, index) -> (the chunk's summed loss, its gradient in z)`, z being a fp32
    copy of the chunk's logit rows [n, V] that chunk_fn may overwrite, as a scalar differentiable
    in the logits: each chunk's gradient is written into its rows of one logits-shaped buffer."""

    def compute(logits: torch.Tensor, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        flat = logits.reshape(-1, logits.shape[-1])
        grad = torch.zeros_like(flat) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, positions.numel(), chunk_size):
            index = positions[start:start + chunk_size]
            value, chunk_grad = chunk_fn(flat.index_select(0, index).float(), start, index)
            total += value
            if want_grad:
                grad.index_copy_(0, index, chunk_grad.to(grad.dtype))
        return total, grad

    return _HandedOnGradient.apply(logits, compute, torch.is_grad_enabled() and logits.requires_grad)
