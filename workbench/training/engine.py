"""The loss engine: every per-token term of training applied through the LM head one chunk of
completion positions at a time, so training never holds a [batch, seq, vocab] tensor it need not.

The model's forward stops at its final hidden states (`modeling.head.hidden_states_out`).
`chunked_loss` then, for each chunk of positions whose next token carries a label, projects the
chunk's hidden states through the head (its LoRA branch and post-head steps included) under
autograd on detached copies, hands the fp32 logits z [n, V] and their log-softmax, computed once,
to each per-token term (`training.terms`), which returns its value summed over the chunk and its
gradient in z in closed form, and pushes the weighted sum of those gradients back through the head at once: the chunk's
gradient in its hidden states is written into one [B*T, H] buffer and the head's trainable
parameters accumulate theirs. The backward of the whole returns those stored gradients times the
upstream gradient, so nothing is recomputed, and the gradients reach the real parameters only in
backward (DDP's hooks fire there, once).

Where the forward cannot stop early (FSDP shards the head, `train.loss_head: full`), the source is
the model's own logits [B, T, V] and the head is the identity: the same loop over logit rows.

Precision: with fp16 inputs (`model.dtype: float16`) the head runs in fp32 and the stored
gradients stay fp32 until backward has multiplied them by the upstream gradient, the loss scale:
computed in fp16 before it, per-token gradients of order 1e-9 would round to 0.

Memory beyond the decoder: the source's gradient ([B*T, H], or [B*T, V] for logits) and, per
chunk, about five [chunk, V] fp32 tensors. Positions without a label are never projected.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from workbench.modeling.head import Head, lm_head, sharded_head
from workbench.modeling.lora import as_base, unwrap_peft
from workbench.training.terms import Chunk, TokenTerm

# The base's side of a KL for the current micro-batch (`base_reference`), made once when first asked for.
BaseReference = Callable[[], tuple[torch.Tensor, Head | None]]


class _HandedOn(torch.autograd.Function):
    """loss = sum_k coef_k * term_k over the chunks: the gradients in the source and the head's
    trainable parameters are computed in forward and handed on, times the upstream gradient, in
    backward. inputs: the source [B, T, H or V], then the head's trainable parameters."""

    @staticmethod
    def forward(ctx, source, run, *params):
        loss, ctx.grads = run(source, params, any(ctx.needs_input_grad))
        ctx.dtypes = [source.dtype, *(p.dtype for p in params)]
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # handed on, not copied: backward runs once
        # times the fp32 scalar as it is: a loss scale cast to fp16 first (65,536) would be inf
        source, *params = [None if g is None else g.mul_(grad_loss).to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return source, None, *params


def chunked_loss(source: torch.Tensor, head: Head | None, mask: torch.Tensor, terms: Sequence[TokenTerm],
                 coefs: Sequence[torch.Tensor | float], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, totals): loss = sum_k coefs[k] * totals[k], differentiable in source and in the head's
    trainable parameters; totals [K] (no gradient): each term summed over the positions where
    mask [B, T] is True. source: final hidden states [B, T, H] with their head, or logits
    [B, T, V] with head None. A term whose coef is 0 is measured only (a monitor)."""
    positions = mask.reshape(-1).nonzero().squeeze(1)
    coefs = [float(c) for c in coefs]  # one read per call; a term weighted 0.0 is measured only
    named = [] if head is None else [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    fp32 = source.dtype == torch.float16
    frozen = {} if head is None or not fp32 else {
        n: p.float() for n, p in head.named_parameters() if not p.requires_grad and p.dtype != torch.float32}
    totals = torch.zeros(len(terms), dtype=torch.float32, device=source.device)

    def project(rows, copies):
        """The chunk's logits from its source rows, and whether autograd must carry z back to them."""
        if head is None:
            return rows, False
        precision = torch.autocast(rows.device.type, enabled=False) if fp32 else contextlib.nullcontext()
        with torch.enable_grad(), precision:
            return functional_call(head, {**frozen, **copies}, (rows,), strict=False), True

    def run(source, params, want_grad):
        flat = source.detach().reshape(-1, source.shape[-1])
        copies = {n: (p.detach().float() if fp32 else p.detach()).requires_grad_(want_grad)
                  for (n, _), p in zip(named, params)}
        grad_source = torch.zeros(flat.shape, device=flat.device,
                                  dtype=torch.float32 if fp32 else flat.dtype) if want_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=source.device)
        for start in range(0, positions.numel(), chunk_size):
            index = positions[start:start + chunk_size]
            rows = flat.index_select(0, index)
            rows = (rows.float() if fp32 and head is not None else rows).requires_grad_(want_grad and head is not None)
            logits, through_head = project(rows, copies)
            # the terms read z and never write it (a soft-cap's tanh keeps its output for backward)
            chunk = Chunk(logits.detach().to(torch.float32), start, index)
            grad = None
            for k, (term, coef) in enumerate(zip(terms, coefs)):
                chunk.last = k == len(terms) - 1
                value, term_grad = term(chunk)
                totals[k] += value.detach()
                loss += coef * value.detach()
                if want_grad and coef != 0.0:
                    grad = term_grad.mul_(coef) if grad is None else grad.add_(term_grad, alpha=coef)
            if not want_grad or grad is None:
                continue
            if through_head:
                torch.autograd.backward(logits, grad.to(logits.dtype))
                grad = rows.grad
            grad_source.index_copy_(0, index, grad.to(grad_source.dtype))
        param_grads = []
        if want_grad:
            param_grads = [torch.zeros_like(c) if c.grad is None else c.grad for c in copies.values()]
        return loss, (None if grad_source is None else grad_source.view(source.shape), *param_grads)

    params = [p for _, p in named]
    if not (torch.is_grad_enabled() and (source.requires_grad or any(p.requires_grad for p in params))):
        with torch.no_grad():
            return run(source, params, False)[0], totals
    return _HandedOn.apply(source, run, *params), totals


def base_reference(model: torch.nn.Module, inputs: dict, fused: bool) -> tuple[torch.Tensor, Head | None]:
    """The base's side of a KL, computed as the tuned side is (`chunked_loss`'s source): its final
    hidden states [B, T, H] and its head (the base weights of a LoRA-wrapped head), or, when the
    tuned side is the model's own logits or FSDP shards the head, its logits [B, T, V] and None."""
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
    with torch.no_grad(), as_base(model) as peft_model:
        if not fused or sharded_head(model):
            return model(**inputs).logits, None
        with torch.inference_mode():  # no version counters: about 5% of the base forward on 2 CPU cores
            hidden = peft_model.get_base_model().get_decoder()(**inputs).last_hidden_state
        return hidden, lm_head(unwrap_peft(model), base=True)

