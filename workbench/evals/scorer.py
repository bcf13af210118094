"""The request/response boundary of the evals: tasks build `Request`s, one `Scorer` answers them.

Base and tuned share the scorer and the same loaded weights: the base is the PEFT model with its
adapter disabled, and a scaled adapter (0 = base, 1 = tuned) comes from `adapter_scale`.
Log-likelihoods follow lm-evaluation-harness (HFLM, causal LMs): the same context/continuation
split, the same empty-context prefix token, the same left truncation and `is_greedy`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.regularizers.lora_delta import adapter_scale, unwrap_peft

ADAPTERS = ("tuned", "base")


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


@dataclass(frozen=True)
class Response:
    logprob: float  # sum of log p(token | prefix) over the scored continuation tokens
    n_tokens: int  # continuation tokens scored (fewer than encoded only under truncation)
    is_greedy: bool  # every scored continuation token is the argmax of its distribution
    token_logprobs: tuple[float, ...]


class Scorer:
    """Log-likelihoods of continuations under one causal LM, batched with right padding."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 8, max_length: int = 2048):
        if batch_size < 1 or max_length < 1:
            raise ValueError("batch_size and max_length must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.forward_calls = 0

    # --- encoding --------------------------------------------------------------------------

    @property
    def prefix_token_id(self) -> int:
        """lm-eval's prefix for an empty context (HFLM 0.4.13): bos, else the end-of-text token."""
        for token_id in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        raise ValueError("an empty context needs a tokenizer with an eos or bos token")

    def _tok(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, request: Request) -> tuple[list[int], list[int]]:
        """(context_ids, continuation_ids), as lm-eval's HFLM `_encode_pair` splits them."""
        context, continuation = request.context, request.continuation
        if context == "":
            return [self.prefix_token_id], self._tok(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:  # trailing whitespace belongs to the continuation
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._tok(context + continuation)
        context_ids = self._tok(context)
        return context_ids, whole[len(context_ids):]

    # --- scoring ---------------------------------------------------------------------------

    def _adapter_context(self, adapter: str, scale: float):
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        if adapter == "base":
            if scale != 1.0:
                raise ValueError("scale applies to the tuned adapter only")
            return unwrap_peft(self.model).disable_adapter()
        if scale == 1.0:
            return contextlib.nullcontext()
        return adapter_scale(self.model, scale)

    def loglikelihood(self, requests: Sequence[Request], adapter: str = "tuned",
                      scale: float = 1.0, desc: str | None = None) -> list[Response]:
        """One `Response` per request, in the order given."""
        adapter_ctx = self._adapter_context(adapter, scale)
        # (inputs, targets, n_scored) per request: the scored targets are the last n_scored.
        items = []
        for request in requests:
            context_ids, continuation_ids = self.encode(request)
            full = (context_ids + continuation_ids)[-(self.max_length + 1):]
            n_scored = min(len(continuation_ids), len(full) - 1)
            items.append((full[:-1], full[1:], n_scored))

        responses: list[Response | None] = [None] * len(items)
        todo = [i for i, (_, _, n) in enumerate(items) if n > 0]
        for i, (_, _, n) in enumerate(items):
            if n == 0:
                responses[i] = Response(0.0, 0, True, ())
        todo.sort(key=lambda i: (-len(items[i][0]), i))  # longest first

        was_training = self.model.training
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        pad_id = self.prefix_token_id if pad_id is None else int(pad_id)
        try:
            self.model.eval()
            with torch.no_grad(), adapter_ctx:
                starts = range(0, len(todo), self.batch_size)
                for start in tqdm(starts, desc=desc, leave=False, disable=desc is None):
                    chunk = todo[start:start + self.batch_size]
                    for i, response in zip(chunk, self._score_batch([items[i] for i in chunk], pad_id, device)):
                        responses[i] = response
        finally:
            self.model.train(was_training)
        return responses  # type: ignore[return-value]

    def _score_batch(self, batch, pad_id: int, device) -> list[Response]:
        width = max(len(inputs) for inputs, _, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols, targets, owner = [], [], [], []
        for b, (inputs, target, n_scored) in enumerate(batch):
            length = len(inputs)
            input_ids[b, :length] = torch.tensor(inputs, dtype=torch.long)
            attention_mask[b, :length] = 1
            positions = range(length - n_scored, length)
            rows.extend([b] * n_scored)
            cols.extend(positions)
            targets.extend(target[p] for p in positions)
            owner.append(n_scored)
        logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        self.forward_calls += 1
        picked = logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)]
        logprobs = torch.log_softmax(picked.float(), dim=-1)  # [n_scored_total, vocab]
        target_t = torch.tensor(targets, device=logprobs.device)
        token_lp = logprobs.gather(-1, target_t[:, None]).squeeze(-1).cpu().tolist()
        greedy = (logprobs.argmax(-1) == target_t).cpu().tolist()
        out, offset = [], 0
        for n_scored in owner:
            lps = tuple(float(x) for x in token_lp[offset:offset + n_scored])
            out.append(Response(float(sum(lps)), n_scored, bool(all(greedy[offset:offset + n_scored])), lps))
            offset += n_scored
        return out


def multiple_choice(scorer, context: str, choices: Sequence[str], gold: int,
                    adapter: str = "tuned", delimiter: str = " ") -> dict:
    """lm-eval's acc and acc_norm for one item; each choice is scored as delimiter + choice.

    `delimiter` is lm-eval's target_delimiter (" " by default). acc_norm divides each
    log-likelihood by the choice's length in characters, without the delimiter, as lm-eval does
    (`len(choice)` over `doc_to_choice`). "probs" is the softmax over the choice log-likelihoods.
    """
    if not choices:
        raise ValueError("choices is empty")
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold {gold} out of range for {len(choices)} choices")
    continuations = [delimiter + choice for choice in choices]
    responses = scorer.loglikelihood([Request(context, c) for c in continuations], adapter=adapter)
    logprobs = np.array([r.logprob for r in responses], dtype=np.float64)
    return {**choice_outcome(logprobs, choices, gold), "logprobs": logprobs.tolist()}


def choice_outcome(logprobs: np.ndarray, choices: Sequence[str], gold: int) -> dict:
    """acc and acc_norm of one item from its choice log-likelihoods [n_choices], plus what
    calibration needs: the softmax over the choices and the predicted choice's probability."""
    lengths = np.array([len(c) for c in choices], dtype=np.float64)
    pred = int(np.argmax(logprobs))
    pred_norm = int(np.argmax(logprobs / lengths))
    shifted = np.exp(logprobs - logprobs.max())
    probs = shifted / shifted.sum()
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred,
            "pred_norm": pred_norm, "probs": probs.tolist(), "confidence": float(probs[pred]),
            "gold": gold}
