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
from transformers import DynamicCache

from workbench.modeling.head import logits_at
from workbench.scoring.masks import pad_rows
from workbench.distributed import is_main_process, shard_map
from workbench.modeling.lora import adapter_scale, as_base

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

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 8, max_length: int = 2048,
                 share_context: bool = True):
        """share_context: requests with the same context (a multiple-choice item's choices) run the
        context once and their continuations on its KV cache, instead of once per request."""
        if batch_size < 1 or max_length < 1:
            raise ValueError("batch_size and max_length must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.share_context = share_context
        self.forward_calls = 0

    @property
    def continuation_batch(self) -> int:
        """Rows per pass over shared contexts' continuations: short rows (a few tokens each), so
        twice the batch costs about what a batch of whole requests does."""
        return 2 * self.batch_size

    # --- encoding --------------------------------------------------------------------------

    @property
    def prefix_token_id(self) -> int:
        """lm-eval's prefix for an empty context (HFLM 0.4.13): bos, else the end-of-text token."""
        for token_id in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        raise ValueError("an empty context needs a tokenizer with an eos or bos token")

    def _tok(self, text: str) -> list[int]:
        """The tokenizer's own encoding, special tokens included, as lm-eval's HFLM `tok_encode`
        does by default (<bos> first for Gemma; nothing for SmolLM2), but none before a text that
        already starts with the <bos> text (a chat template's rendering), which would double it."""
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode(self, request: Request) -> tuple[list[int], list[int]]:
        """(context_ids, continuation_ids), as lm-eval's HFLM `_encode_pair` splits them."""
        context, continuation = request.context, request.continuation
        if context == "":  # lm-eval: the prefix token, then the continuation without special tokens
            return [self.prefix_token_id], list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
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
            return as_base(self.model)
        if scale == 1.0:
            return contextlib.nullcontext()
        return adapter_scale(self.model, scale)

    def loglikelihood(self, requests: Sequence[Request], adapter: str = "tuned",
                      scale: float = 1.0, desc: str | None = None) -> list[Response]:
        """One `Response` per request, in the order given. Under a multi-process launch each rank
        scores a contiguous share of the requests and every rank gets all responses."""
        desc = desc if is_main_process() else None
        return shard_map(lambda share: self._loglikelihood(share, adapter, scale, desc), list(requests))

    def _loglikelihood(self, requests: list[Request], adapter: str, scale: float, desc: str | None
                       ) -> list[Response]:
        adapter_ctx = self._adapter_context(adapter, scale)
        # (inputs, targets, n_scored) per request: the scored targets are the last n_scored.
        items, contexts = [], []
        for request in requests:
            context_ids, continuation_ids = self.encode(request)
            full = (context_ids + continuation_ids)[-(self.max_length + 1):]
            n_scored = min(len(continuation_ids), len(full) - 1)
            items.append((full[:-1], full[1:], n_scored))
            untruncated = len(full) == len(context_ids) + len(continuation_ids)
            contexts.append(tuple(context_ids) if untruncated and continuation_ids else None)

        responses: list[Response | None] = [None] * len(items)
        for i, (_, _, n) in enumerate(items):
            if n == 0:
                responses[i] = Response(0.0, 0, True, ())
        groups: dict[tuple, list[int]] = {}  # context -> the requests sharing it
        for i, context in enumerate(contexts):
            if responses[i] is None and context is not None and self.share_context:
                groups.setdefault(context, []).append(i)
        shared = [members for members in groups.values() if len(members) > 1]
        in_shared = {i for members in shared for i in members}
        todo = [i for i in range(len(items)) if responses[i] is None and i not in in_shared]
        todo.sort(key=lambda i: (-len(items[i][0]), i))  # longest first
        shared.sort(key=lambda members: (-len(contexts[members[0]]), members[0]))
        batches = [("single", todo[s:s + self.batch_size]) for s in range(0, len(todo), self.batch_size)]
        batches += [("shared", shared[s:s + self.batch_size]) for s in range(0, len(shared), self.batch_size)]

        was_training = self.model.training
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        pad_id = self.prefix_token_id if pad_id is None else int(pad_id)
        try:
            self.model.eval()
            with torch.no_grad(), adapter_ctx:
                for kind, batch in tqdm(batches, desc=desc, leave=False, disable=desc is None):
                    if kind == "single":
                        answered = zip(batch, self._score_batch([items[i] for i in batch], pad_id, device))
                    else:
                        members = [i for group in batch for i in group]
                        continuations = [[items[i][1][-items[i][2]:] for i in group] for group in batch]
                        prefixes = [list(contexts[group[0]]) for group in batch]
                        answered = zip(members, self._score_shared(prefixes, continuations, pad_id, device))
                    for i, response in answered:
                        responses[i] = response
        finally:
            self.model.train(was_training)
        return responses  # type: ignore[return-value]

    def _score_shared(self, contexts: list[list[int]], continuations: list[list[list[int]]], pad_id: int,
                      device) -> list[Response]:
        """Each context once; then its continuations on the context's KV cache, all but their
        last token fed, longest first in passes of similar length so little of a pass is padding.
        Token for token this is the computation of one full sequence per request."""
        mask, cache, first = self._run_contexts(contexts, pad_id, device)
        owner = torch.tensor([g for g, conts in enumerate(continuations) for _ in conts])
        rows = [cont for conts in continuations for cont in conts]
        targets = torch.tensor([cont[0] for cont in rows], device=first.device)
        first = first[owner.to(first.device)]  # [rows, V]: each row's first-token distribution
        token_lps = [[lp] for lp in first.gather(-1, targets[:, None]).squeeze(-1).cpu().tolist()]
        greedy = [[hit] for hit in (first.argmax(-1) == targets).cpu().tolist()]
        longer = sorted((r for r, cont in enumerate(rows) if len(cont) > 1), key=lambda r: (-len(rows[r]), r))
        for start in range(0, len(longer), self.continuation_batch):
            part = longer[start:start + self.continuation_batch]
            lps, hits = self._run_continuations([rows[r] for r in part], owner[part], mask, cache, pad_id, device)
            for r, row_lps, row_hits in zip(part, lps, hits):
                token_lps[r] += row_lps
                greedy[r] += row_hits
        return [Response(float(sum(lps)), len(lps), bool(all(g)), tuple(float(x) for x in lps))
                for lps, g in zip(token_lps, greedy)]

    def _run_contexts(self, contexts: list[list[int]], pad_id: int, device):
        """One pass over the contexts, left-padded so their last tokens align, positions counted
        from each context's first token: (their mask [G, W], their KV cache, the log-softmax
        [G, V] at each last token, which predicts every continuation's first token)."""
        input_ids, mask = pad_rows(contexts, pad_id, side="left")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        at, out = logits_at(self.model, input_ids=input_ids.to(device), attention_mask=mask.to(device),
                            position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
        self.forward_calls += 1
        last = torch.arange(len(contexts), device=device)
        return mask, out.past_key_values, torch.log_softmax(at(last, torch.zeros_like(last)), dim=-1)

    def _run_continuations(self, rows: list[list[int]], owner: torch.Tensor, mask: torch.Tensor, cache,
                           pad_id: int, device) -> tuple[list[list[float]], list[list[bool]]]:
        """One pass feeding each row's continuation but its last token on a copy of its context's
        cache rows (`owner`: the context of each row): per row, the log-probs of tokens 2.. and
        whether each is the argmax."""
        inputs, rest_mask = pad_rows([row[:-1] for row in rows], pad_id)
        width = inputs.shape[1]
        positions = mask.sum(-1)[owner][:, None] + torch.arange(width)
        at, _ = logits_at(self.model, input_ids=inputs.to(device),
                          attention_mask=torch.cat([mask[owner], rest_mask], 1).to(device),
                          position_ids=positions.to(device), past_key_values=_cache_rows(cache, owner.to(device)))
        self.forward_calls += 1
        where = (torch.tensor([j for j, row in enumerate(rows) for _ in row[1:]], device=device),
                 torch.tensor([t for row in rows for t in range(len(row) - 1)], device=device))
        targets = torch.tensor([token for row in rows for token in row[1:]], device=device)
        logprobs = torch.log_softmax(at(*where), dim=-1)
        lps = logprobs.gather(-1, targets[:, None]).squeeze(-1).cpu().tolist()
        hits = (logprobs.argmax(-1) == targets).cpu().tolist()
        bounds = np.cumsum([0] + [len(row) - 1 for row in rows])
        return ([lps[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                [hits[a:b] for a, b in zip(bounds[:-1], bounds[1:])])

    def _score_batch(self, batch, pad_id: int, device) -> list[Response]:
        input_ids, attention_mask = pad_rows([inputs for inputs, _, _ in batch], pad_id)
        rows, cols, targets, owner = [], [], [], []
        for b, (inputs, target, n_scored) in enumerate(batch):
            length = len(inputs)
            positions = range(length - n_scored, length)
            rows.extend([b] * n_scored)
            cols.extend(positions)
            targets.extend(target[p] for p in positions)
            owner.append(n_scored)
        at, _ = logits_at(self.model, input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        self.forward_calls += 1
        # [n_scored_total, vocab]: only the continuation positions go through the head
        logprobs = torch.log_softmax(at(torch.tensor(rows, device=device), torch.tensor(cols, device=device)), dim=-1)
        target_t = torch.tensor(targets, device=logprobs.device)
        token_lp = logprobs.gather(-1, target_t[:, None]).squeeze(-1).cpu().tolist()
        greedy = (logprobs.argmax(-1) == target_t).cpu().tolist()
        out, offset = [], 0
        for n_scored in owner:
            lps = tuple(float(x) for x in token_lp[offset:offset + n_scored])
            out.append(Response(float(sum(lps)), n_scored, bool(all(greedy[offset:offset + n_scored])), lps))
            offset += n_scored
        return out


def _cache_rows(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A new cache holding the given batch rows of `cache` (rows may repeat)."""
    rows = []
    for keys, values, window in cache:
        selected = (keys.index_select(0, index), values.index_select(0, index))
        rows.append(selected if window is None else (*selected, window))
    return DynamicCache(ddp_cache_data=rows)


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
