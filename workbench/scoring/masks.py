"""Which tokens are scored, and how ragged token lists become one tensor.

A label of IGNORE (-100, the value torch's cross_entropy skips) marks a token the loss does not
count: prompts, padding. The logits at position t predict the token at t + 1, so every loss,
penalty and score looks at positions whose *next* label is not IGNORE.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels moved one left and padded with IGNORE: entry t is the token the logits at t
    predict. Pairs with the whole logits tensor, so the logits are never sliced (no copy)."""
    return F.pad(labels, (0, 1), value=IGNORE)[:, 1:]


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions t whose logits predict a labelled token (labels[t + 1] != IGNORE)."""
    return shifted_labels(labels) != IGNORE


def scored_positions(labels: Sequence[int]) -> list[int]:
    """`next_token_mask` for one example's label list: the positions p with labels[p + 1] != IGNORE."""
    return [p for p in range(len(labels) - 1) if labels[p + 1] != IGNORE]


def pad_rows(rows: Sequence[Sequence[int]], value: int, side: Literal["right", "left"] = "right",
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, mask), both [len(rows), width] long: each row placed at the left (right padding) or
    at the right (left padding, so every row ends at the same column), the rest filled with
    `value`; mask is 1 where a row's tokens are. width defaults to the longest row."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    values = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        values[i, cols] = torch.as_tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return values, mask
