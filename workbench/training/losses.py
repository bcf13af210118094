"""The task loss: next-token cross-entropy, with label smoothing, or DFT.

DFT (dynamic fine-tuning, Wu et al. 2025; TRL's `loss_type="dft"`) writes the SFT gradient as a
policy gradient whose implicit reward is 1 / p(y), which grows without bound on tokens the model
finds unlikely, and cancels it: each token's NLL is weighted by its own probability, detached,

    loss_t = -sg(p_t(y_t)) * log p_t(y_t)        gradient: -p_t(y_t) * d log p_t(y_t)

so a token the base finds unlikely pulls the weights less than under plain NLL. With KL-to-base
on, DFT plus the KL term is anchored SFT (ASFT), its anchor the adapter-disabled base.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from workbench.scoring.masks import IGNORE, shifted_labels

TaskLoss = Literal["nll", "dft"]


def token_losses(logits: torch.Tensor, labels: torch.Tensor, loss: TaskLoss = "nll",
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token task loss [n] for logits [n, V] and labels [n]; 0 where the label is IGNORE.

    nll: cross-entropy, smoothed toward the uniform distribution by `label_smoothing` (torch's
    own: (1 - eps) * NLL + eps * mean over the vocabulary of -log q). dft: NLL times the
    detached probability of the label. Smoothing has no DFT form: DFT reweights the likelihood
    of the one observed token, and the smoothing term has no observed token to weight, so the
    recipe refuses the pair (config.recipe).
    """
    logits = logits.float()
    per_token = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none",
                                label_smoothing=label_smoothing)
    if loss == "dft":
        if label_smoothing:
            raise ValueError("label smoothing has no DFT form")
        per_token = per_token * torch.exp(-per_token.detach())  # p(y) = exp(-NLL); 0 stays 0 where ignored
    return per_token


def causal_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch=None, label_smoothing: float = 0.0,
                   loss: TaskLoss = "nll") -> torch.Tensor:
    """The task loss as transformers' causal-LM loss normalises it: the labels shifted by padding
    (so the logits are not copied), summed over label tokens and divided by the tokens in the
    accumulated batch when that is given, else the mean over this batch's label tokens.

    Label smoothing is done inside torch's `cross_entropy` rather than by HF's `LabelSmoother`,
    which builds several more vocabulary-sized tensors and averages per micro-batch, so
    accumulation would change the loss.
    """
    logits = outputs["logits"]
    labels = shifted_labels(labels).to(logits.device).reshape(-1)
    per_token = token_losses(logits.reshape(-1, logits.shape[-1]), labels, loss, label_smoothing)
    if num_items_in_batch is None:
        return per_token.sum() / (labels != IGNORE).sum().clamp(min=1)
    return per_token.sum() / torch.as_tensor(num_items_in_batch, device=per_token.device)
