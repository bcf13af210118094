"""Retention on general text, shared by `workbench eval` and the training-time retention probe.

The base side (each chunk's summed NLL and the base's top-k log-probs per token) depends only on
the base weights and goes through `BaseCache` under one key, so an eval and a probe with the same
settings share it. The tuned side is scored per chunk: its NLL, and the KL bounds and top-1
agreement against the cached top-k. The point values here are the ones `workbench eval` reports;
the eval adds bootstrap CIs on top.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np
import torch

from workbench.modeling.lora import as_base as base_mode
from workbench.scoring.base_cache import BaseCache, ragged
from workbench.scoring.tokens import scored_tokens
from workbench.scoring.topk_kl import base_topk, kl_bounds

COMPONENT = "general"


def nll_rows(rows: list[torch.Tensor]) -> np.ndarray:
    """[n, 2]: (summed NLL, token count) per example, from each example's label log-probs."""
    return np.array([[-float(r.sum()), len(r)] for r in rows], dtype=np.float64)


@dataclass
class GeneralScores:
    """Per chunk, base and tuned: the inputs of every general-text metric."""

    base_nll: np.ndarray  # [n, 2] summed NLL and token count
    tuned_nll: np.ndarray  # [n, 2]
    kl_low: np.ndarray  # [n] mean over the chunk's tokens of the KL(base || tuned) lower bound
    kl_high: np.ndarray  # [n] the upper bound
    agree: np.ndarray  # [n] top-1 agreement

    @property
    def ppl_ratio(self) -> float:
        """ppl_tuned / ppl_base with tokens pooled over chunks (`evals.metrics.ratio_bootstrap_ci`)."""
        b, t = self.base_nll.sum(axis=0), self.tuned_nll.sum(axis=0)
        return math.exp(t[0] / t[1] - b[0] / b[1])

    def points(self) -> dict[str, float]:
        """The point values under their metric names' last part."""
        t = self.tuned_nll.sum(axis=0)
        return {"ppl_ratio": self.ppl_ratio, "ppl": math.exp(t[0] / t[1]), "kl": float(self.kl_low.mean()),
                "kl_upper": float(self.kl_high.mean()), "top1_agreement": float(self.agree.mean())}


def base_side(model, chunks: list[dict], top_k: int, batch_size: int, pad_id: int, cache: BaseCache,
              key_parts: tuple, as_base: Callable[[], ContextManager] | None = None) -> dict[str, torch.Tensor]:
    """The base's NLL per chunk and top-k log-probs per token, from the cache or scored under
    `as_base()` (default: `modeling.lora.as_base(model)`, the adapters disabled). key_parts: the
    settings and data the entry depends on."""
    def compute() -> dict[str, torch.Tensor]:
        def keep(i, start, logprobs):
            return tuple(t.cpu() for t in base_topk(logprobs, top_k))

        with (as_base or functools.partial(base_mode, model))():
            scored = scored_tokens(model, chunks, batch_size, pad_id, keep, desc="base: general text")
        rows = [row for row, _ in scored]
        parts = [part for _, kept in scored for part in kept]
        return {"nll": torch.from_numpy(nll_rows(rows)), "topk_values": torch.cat([v for v, _ in parts]),
                "topk_ids": torch.cat([ids for _, ids in parts]).to(torch.int32),
                "offsets": ragged(rows)["offsets"]}

    return cache.get(COMPONENT, key_parts, compute)


@torch.no_grad()
def tuned_side(model, chunks: list[dict], base: dict[str, torch.Tensor], batch_size: int, pad_id: int,
               desc: str | None = None) -> GeneralScores:
    """Score the model as it stands (adapter and scale already set) against the base side."""
    offsets = base["offsets"]

    def compare(i, start, logprobs):
        """(KL lower bound, KL upper bound, top-1 agreement), each summed over the tokens
        start:start + n of chunk i."""
        lo = offsets[i] + start
        b_values, b_ids = base["topk_values"][lo:lo + len(logprobs)], base["topk_ids"][lo:lo + len(logprobs)].long()
        low, high = kl_bounds(b_values, b_ids, logprobs.cpu())
        agree = (logprobs.argmax(-1).cpu() == b_ids[:, 0]).double().sum()
        return float(low.sum()), float(high.sum()), float(agree)

    scored = scored_tokens(model, chunks, batch_size, pad_id, compare, desc=desc)
    per_chunk = np.array([np.sum(kept, axis=0) / len(row) for row, kept in scored])  # [chunks, 3]: means
    return GeneralScores(base["nll"].numpy(), nll_rows([row for row, _ in scored]),
                         per_chunk[:, 0], per_chunk[:, 1], per_chunk[:, 2])
