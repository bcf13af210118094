"""The fused loss head: the LM head and every per-token term applied one chunk of completion
positions at a time, so training never holds a [batch, seq, vocab] tensor.

The forward of the model stops at the final hidden states (`scoring.head.hidden_states_out`).
`fused_loss` then, for each chunk of positions whose next token carries a label, projects the
chunk's hidden states through the head (its LoRA branch and soft-cap included) under autograd on
detached copies, hands the fp32 logits z [n, V] to each per-token term, which returns its value
summed over the chunk and its gradient in z in closed form, and pushes the weighted sum of those
gradients back through the head at once: the chunk's gradient in its hidden states is written into
one [B*T, H] buffer and the head's trainable parameters accumulate theirs. The backward of the
whole returns those stored gradients times the upstream gradient, so nothing is recomputed, and
the gradients reach the real parameters only in backward (DDP's hooks fire there, once).

Memory beyond the decoder: the hidden-states gradient [B*T, H] and, per chunk, about five
[chunk, V] fp32 tensors (the head's output, z, a term's working copy, its gradient and their sum).
Positions without a label are never projected.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from workbench.config.recipe import HEAD_CHUNK  # noqa: F401  (the default, with its reason)
from workbench.scoring.head import Head
from workbench.scoring.masks import shifted_labels

# term(z, start, index) -> (the term summed over the chunk, its gradient in z [n, V]).
# z [n, V]: fp32 tuned logits of the chunk, which the term may overwrite; start: the chunk's
# offset among the batch's completion positions (row-major, as mask.nonzero() lists them: a
# cached reference's rows); index [n]: the chunk's flat positions in the [B*T] batch.
TokenTerm = Callable[[torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def task_term(labels: torch.Tensor, loss: str = "nll", smoothing: float = 0.0) -> TokenTerm:
    """The task loss (`training.losses.token_losses`) per chunk, labels [B, T] (unshifted). Per
    token, with q = softmax(z) and y the label:
      nll, smoothing e:  value  -(1 - e) log q_y - (e / V) sum_v log q_v
                         grad   q - (1 - e) onehot(y) - e / V
      dft:               value  -sg(q_y) log q_y
                         grad   q_y (q - onehot(y))"""
    if loss == "dft" and smoothing:
        raise ValueError("label smoothing has no DFT form")
    targets = shifted_labels(labels).reshape(-1)

    def term(z, start, index):
        y = targets.index_select(0, index)[:, None]
        log_q = F.log_softmax(z, dim=-1)
        log_qy = log_q.gather(-1, y)
        if loss == "dft":
            qy = log_qy.exp()
            grad = log_q.exp_().scatter_add_(-1, y, torch.full_like(qy, -1.0)).mul_(qy)
            return -(qy * log_qy).sum(), grad
        value = -(1.0 - smoothing) * log_qy.sum()
        if smoothing:
            value = value - smoothing / z.shape[-1] * log_q.sum()
        grad = log_q.exp_().scatter_add_(-1, y, torch.full_like(log_qy, smoothing - 1.0))
        return value, grad.sub_(smoothing / z.shape[-1]) if smoothing else grad

    return term


class _FusedHead(torch.autograd.Function):
    """loss = sum_k coef_k * term_k over the chunks; gradients computed in forward, handed on in
    backward. inputs: hidden [B, T, H] and the head's trainable parameters."""

    @staticmethod
    def forward(ctx, hidden, run, *params):
        loss, ctx.grads = run(hidden, params, any(ctx.needs_input_grad))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # handed on, not copied: backward runs once
        # times the fp32 scalar as it is: a loss scale cast to fp16 first (65,536) would be inf
        return (None if grads[0] is None else grads[0].mul_(grad_loss), None,
                *(None if g is None else g.mul_(grad_loss) for g in grads[1:]))


def fused_loss(hidden: torch.Tensor, head: Head, mask: torch.Tensor, terms: Sequence[TokenTerm],
               coefs: Sequence[torch.Tensor | float], chunk_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, totals): loss = sum_k coefs[k] * totals[k], differentiable in hidden [B, T, H] and in
    the head's trainable parameters; totals [K] (no gradient): each term summed over the positions
    where mask [B, T] is True. A term whose coef is 0 is measured only (a monitor)."""
    positions = mask.reshape(-1).nonzero().squeeze(1)
    names = [name for name, p in head.named_parameters() if p.requires_grad]
    params = [p for p in head.parameters() if p.requires_grad]
    totals = torch.zeros(len(terms), dtype=torch.float32, device=hidden.device)

    def run(hidden, params, want_grad):
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        copies = {n: p.detach().requires_grad_(want_grad) for n, p in zip(names, params)}
        grad_hidden = torch.zeros_like(flat) if want_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, positions.numel(), chunk_size):
            index = positions[start:start + chunk_size]
            h = flat.index_select(0, index).requires_grad_(want_grad)
            with torch.enable_grad():
                logits = functional_call(head, copies, (h,), strict=False)
            # fp32 logits are handed to the terms as they are (a linear head's backward never reads
            # its output, and autograd's version check would refuse one that did); a soft-cap's
            # tanh saves its output, so it gets a copy
            z = logits.detach().to(torch.float32, copy=head.softcap is not None)
            grad = None
            for k, (term, coef) in enumerate(zip(terms, coefs)):
                last = k == len(terms) - 1
                value, term_grad = term(z if last else z.clone(), start, index)
                totals[k] += value.detach()
                loss += coef * value.detach()
                if want_grad and not (isinstance(coef, float) and coef == 0.0):
                    grad = term_grad.mul_(coef) if grad is None else grad.add_(term_grad.mul_(coef))
            if want_grad and grad is not None:
                torch.autograd.backward(logits, grad.to(logits.dtype))
                grad_hidden.index_copy_(0, index, h.grad)
        param_grads = [copies[n].grad if want_grad else None for n in names]
        if want_grad:
            param_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, param_grads)]
        return loss, (None if grad_hidden is None else grad_hidden.view_as(hidden), *param_grads)

    loss = _FusedHead.apply(hidden, run, *params)
    return loss, totals
