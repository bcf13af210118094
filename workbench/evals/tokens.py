"""Token-level scoring of tokenised examples ({input_ids, labels}) and greedy generation.

These back the evals that work on token ids rather than text requests: perplexity and KL on
general text, loss and membership scores on target examples, and exact-match generation.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from ..data import IGNORE


def _batches(examples: list[dict], batch_size: int) -> Iterator[list[int]]:
    """Index batches, longest examples first (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def scored_positions(labels: list[int]) -> list[int]:
    """Positions p whose logits predict a label: labels[p + 1] != IGNORE."""
    return [p for p in range(len(labels) - 1) if labels[p + 1] != IGNORE]


@torch.no_grad()
def token_logprobs(model, examples: list[dict], batch_size: int, pad_id: int,
                   with_distribution: Callable[[int, torch.Tensor], None] | None = None,
                   desc: str | None = None) -> list[torch.Tensor]:
    """Per example, the log-probs of its label tokens: a list of [n_i] float64 tensors.

    with_distribution(i, logprobs): called with example i's full log-softmax [n_i, V] (fp32) at
    the same positions, for KL and agreement, so no [batch, seq, V] tensor outlives its batch.
    """
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(examples)
    batches = list(_batches(examples, batch_size))
    for batch in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        width = max(len(examples[i]["input_ids"]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(examples[i]["input_ids"])
            ids[row, :n] = torch.tensor(examples[i]["input_ids"])
            mask[row, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, i in enumerate(batch):
            labels = examples[i]["labels"]
            positions = torch.tensor(scored_positions(labels), dtype=torch.long, device=logits.device)
            logprobs = torch.log_softmax(logits[row, positions].float(), dim=-1)  # [n_i, V]
            targets = torch.tensor([labels[p + 1] for p in positions.tolist()], device=logits.device)
            out[i] = logprobs.gather(-1, targets[:, None]).squeeze(-1).double().cpu()
            if with_distribution is not None:
                with_distribution(i, logprobs)
    return out  # type: ignore[return-value]


def prompt_and_reference(example: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): everything before the first labelled token, and the
    contiguous labelled span that follows (a completion, or the first assistant turn)."""
    labels = example["labels"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE)
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE), len(labels))
    return list(example["input_ids"][:start]), list(labels[start:end])


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: list[int], batch_size: int,
                    pad_id: int, eos_id: int, desc: str | None = None) -> list[list[int]]:
    """Greedy continuations of each prompt, up to its max_new_tokens, cut after the first eos."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=desc is None):
        batch = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every row continues at the same position
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
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
