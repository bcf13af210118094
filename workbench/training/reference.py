"""The KL-to-base reference as a cache: the base model's top-k next-token log-probs at every
completion position of a training set, computed once, stored on disk and reused across epochs,
resumed runs and every recipe that trains the same base on the same examples.

Entries live under `<cache>/reference/`, keyed by the base-weight fingerprint, the training
examples' fingerprint, k and the temperature; they are written under a file lock and renamed into
place (see `scoring.base_cache`), so concurrent runs or ranks compute an entry once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.data.examples import Collator, data_fingerprint
from workbench.distributed import is_main_process, shard_map
from workbench.scoring.base_cache import BaseCache
from workbench.modeling.head import logits_at as head_logits_at
from workbench.scoring.tokens import SCORE_CHUNK
from workbench.scoring.topk_kl import base_topk
from workbench.io import cache_dir
from workbench.modeling.lora import as_base
from workbench.scoring.masks import next_token_mask


class TopKReference:
    """values, ids [N, k]: the cached positions of all examples, in order; offsets [n + 1]:
    example i owns rows offsets[i]:offsets[i + 1] (its completion positions, in sequence order)."""

    def __init__(self, values: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor):
        self.values, self.ids, self.offsets = values, ids.long(), offsets.tolist()

    @property
    def top_k(self) -> int:
        return self.values.shape[1]

    def lookup(self, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of a batch's examples (`index`: their positions in the training set), in batch
        order: row-major, as `mask.nonzero()` visits a right-padded batch."""
        rows = [torch.arange(self.offsets[i], self.offsets[i + 1]) for i in index.tolist()]
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        return self.values[rows].to(device), self.ids[rows].to(device)


def build_topk_reference(model, examples: list[dict], collator: Collator, top_k: int, temperature: float,
                         batch_size: int = 8) -> dict[str, torch.Tensor]:
    """The base's (adapter disabled) top-k log-probs of softmax(logits / temperature) at every
    position whose next token carries a label, for each example; tensors for `TopKReference`.
    Under a multi-process launch each rank computes a contiguous share of the examples."""
    per_example = shard_map(lambda share: _topk_rows(model, share, collator, top_k, temperature, batch_size),
                            examples)
    counts = torch.tensor([len(values) for values, _ in per_example], dtype=torch.long)
    return {"values": torch.cat([values for values, _ in per_example]),
            "ids": torch.cat([ids for _, ids in per_example]),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])}


def _topk_rows(model, examples: list[dict], collator: Collator, top_k: int, temperature: float,
               batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example (values [n_i, k] fp32, ids [n_i, k] int32) on the CPU."""
    device = next(model.parameters()).device
    out = []
    starts = range(0, len(examples), batch_size)
    with as_base(model) as peft_model:
        for start in tqdm(starts, desc=f"reference top-{top_k}", disable=not is_main_process()):
            batch = collator(examples[start:start + batch_size])
            logits_at, _ = head_logits_at(peft_model, input_ids=batch["input_ids"].to(device),
                                          attention_mask=batch["attention_mask"].to(device))
            mask = next_token_mask(batch["labels"]).to(device)
            rows, cols = mask.nonzero(as_tuple=True)  # only these go through the head, SCORE_CHUNK at a time
            parts = [base_topk(F.log_softmax(logits_at(rows[s:s + SCORE_CHUNK], cols[s:s + SCORE_CHUNK]) / temperature,
                                             dim=-1), top_k) for s in range(0, max(len(rows), 1), SCORE_CHUNK)]
            values, ids = torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])
            counts = mask.sum(1).tolist()  # per example; clones, so a gather pickles no whole batch
            out.extend((v.clone(), i.clone()) for v, i in zip(values.cpu().split(counts),
                                                               ids.to(torch.int32).cpu().split(counts)))
    return out


def topk_reference_for(model, examples: list[dict], collator: Collator, base_fingerprint: str, top_k: int,
                       temperature: float, batch_size: int = 8) -> tuple[TopKReference, dict]:
    """The cached reference for these examples (computed and stored on a miss), and a record of
    it for run.json."""
    cache = BaseCache(base_fingerprint, root=cache_dir() / "reference")
    key = (data_fingerprint(examples), top_k, temperature)
    tensors = cache.get("kl_topk", key, lambda: build_topk_reference(model, examples, collator, top_k,
                                                                        temperature, batch_size))
    reference = TopKReference(tensors["values"], tensors["ids"], tensors["offsets"])
    record = {"path": str(cache.path("kl_topk", *key)), "top_k": reference.top_k,
              "positions": int(reference.values.shape[0]), "cached": bool(cache.hits),
              "bytes": int(sum(t.numel() * t.element_size() for t in tensors.values()))}
    return reference, record
