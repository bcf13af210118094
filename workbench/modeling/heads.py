"""The LM head as the model's own forward applies it: final hidden states to the logits it returns.

Code that runs the decoder body and applies the head itself, a chunk of tokens at a time (the
KL-to-base reference), must apply what the model's forward does after the head's matmul too, or
it scores another distribution: Gemma 2 soft-caps its logits (c * tanh(z / c), c = 30 in the
released models), Cohere multiplies them by `logit_scale` (0.0625), Granite divides them by
`logits_scaling`. An architecture with another post-head step is refused (`check_head`).
"""

from __future__ import annotations

from typing import Callable

import torch

from workbench.errors import UsageError


def output_head(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [..., H] -> logits [..., V] of `model` (a transformers causal LM, not the PEFT
    wrapper), in the head's dtype. A LoRA-wrapped head is applied with its base weights only."""
    head = model.get_output_embeddings()
    head = getattr(head, "base_layer", head)
    config = model.config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    if cap is None and scale is None and divisor is None:
        return head

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if cap is not None:  # in the order and dtype of Gemma 2's forward, so the base matches bit for bit
            logits = torch.tanh(logits / cap) * cap
        return logits

    return apply


@torch.no_grad()
def check_head(model: torch.nn.Module, name: str) -> None:
    """UsageError unless `output_head` of the decoder's hidden states gives the logits of the
    model's forward (eval mode, 8 tokens, relative 1e-4: both sides run the same matmuls, so an
    unlisted post-head step, even a 1% scale, shows). `model`: a transformers causal LM."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.arange(1, 9, device=model.get_input_embeddings().weight.device)[None]
        logits = model(input_ids=ids).logits.float()
        ours = output_head(model)(model.get_decoder()(input_ids=ids).last_hidden_state).float()
    finally:
        model.train(was_training)
    error = ((ours - logits).abs().max() / logits.abs().max().clamp(min=1e-30)).item()
    if not error <= 1e-4:
        raise UsageError(f"model '{name}' ({type(model).__name__}): its forward changes the logits after the "
                         f"LM head in a way the KL-to-base reference does not reproduce (relative difference "
                         f"{error:.2g}); use kl_to_base.reference: topk_cache")
