"""Token-level scoring of tokenised examples ({input_ids, labels}) and greedy generation.

These back the evals that work on token ids rather than text requests: perplexity and KL on
general text, loss and membership scores on target examples, and exact-match generation.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from workbench.modeling.head import logits_at as head_logits_at
from workbench.scoring.masks import IGNORE, pad_rows, scored_positions
from workbench.distributed import is_main_process, shard_map


def _batches(examples: list[dict], batch_size: int) -> Iterator[list[int]]:
    """Index batches, longest examples first (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def token_logprobs(model, examples: list[dict], batch_size: int, pad_id: int, desc: str | None = None
                   ) -> list[torch.Tensor]:
    """Per example, the log-probs of its label tokens: a list of [n_i] float64 tensors."""
    return [row for row, _ in scored_tokens(model, examples, batch_size, pad_id, None, desc)]


SCORE_CHUNK = 512  # positions projected through the head at a time: 512 x 128k fp32 logits is 250 MB


def scored_tokens(model, examples: list[dict], batch_size: int, pad_id: int,
                  summarize: Callable[[int, int, torch.Tensor], Any] | None = None, desc: str | None = None
                  ) -> list[tuple[torch.Tensor, list]]:
    """Per example (its label log-probs [n_i] float64, [summarize(i, start, logprobs) per chunk]).

    The forward stops at the final hidden states (`modeling.head.logits_at`); only the positions
    whose next token carries a label go through the LM head, SCORE_CHUNK of them at a time.
    summarize(i, start, logprobs) gets example i's log-softmax [n, V] (fp32) at its scored
    positions start:start + n, for KL and agreement, and returns what to keep of it, so no
    [batch, seq, V] tensor exists. Under a multi-process launch each rank scores a contiguous
    share of the examples and every rank gets all results.
    """
    desc = desc if is_main_process() else None
    return shard_map(lambda share: _scored_tokens(model, share, batch_size, pad_id, summarize, desc),
                     list(enumerate(examples)))


@torch.no_grad()
def _scored_tokens(model, indexed: list[tuple[int, dict]], batch_size: int, pad_id: int, summarize,
                   desc: str | None) -> list[tuple[torch.Tensor, list]]:
    device = next(model.parameters()).device
    examples = [example for _, example in indexed]
    out: list[tuple[torch.Tensor, list] | None] = [None] * len(examples)
    batches = list(_batches(examples, batch_size))
    for batch in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        ids, mask = pad_rows([examples[i]["input_ids"] for i in batch], pad_id)
        logits_at, _ = head_logits_at(model, input_ids=ids.to(device), attention_mask=mask.to(device))
        for row, i in enumerate(batch):
            labels = examples[i]["labels"]
            positions = scored_positions(labels)
            scores, kept = [], []
            for start in range(0, len(positions), SCORE_CHUNK):
                cols = torch.tensor(positions[start:start + SCORE_CHUNK], dtype=torch.long, device=device)
                logprobs = torch.log_softmax(logits_at(torch.full_like(cols, row), cols), dim=-1)  # [n, V]
                targets = torch.tensor([labels[p + 1] for p in cols.tolist()], device=device)
                scores.append(logprobs.gather(-1, targets[:, None]).squeeze(-1).double().cpu())
                if summarize is not None:
                    kept.append(summarize(indexed[i][0], start, logprobs))
            out[i] = (torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64), kept)
    return out  # type: ignore[return-value]


def prompt_and_reference(example: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): everything before the first labelled token, and the
    contiguous labelled span that follows (a completion, or the first assistant turn)."""
    labels = example["labels"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE)
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE), len(labels))
    return list(example["input_ids"][:start]), list(labels[start:end])


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: list[int], batch_size: int,
                    pad_id: int, eos_id: int, desc: str | None = None) -> list[list[int]]:
    """Greedy continuations of each prompt, up to its max_new_tokens, cut after the first eos.
    Under a multi-process launch each rank generates a contiguous share."""
    desc = desc if is_main_process() else None

    def generate(share: list[tuple[list[int], int]]) -> list[list[int]]:
        return _greedy_generate(model, [p for p, _ in share], [n for _, n in share], batch_size, pad_id, eos_id,
                                desc)

    return shard_map(generate, list(zip(prompts, max_new_tokens)))


@torch.no_grad()
def _greedy_generate(model, prompts: list[list[int]], max_new_tokens: list[int], batch_size: int,
                     pad_id: int, eos_id: int, desc: str | None) -> list[list[int]]:
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=desc is None):
        batch = order[start:start + batch_size]
        # left padding: every row continues at the same position
        ids, mask = pad_rows([prompts[i] for i in batch], pad_id, side="left")
        width = ids.shape[1]
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max(max_new_tokens[i] for i in batch),
                                   do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id,
                                   generation_config=_greedy_config())[:, width:].cpu().tolist()
        for row, i in enumerate(batch):
            tokens = generated[row][:max_new_tokens[i]]
            out[i] = tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens
    return out


def _greedy_config():
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, num_beams=1)
