"""KL(base || tuned) per token from a cached top-k of the base, with exact lower and upper bounds.

The base side of the KL eval is cached once per suite: for each token, the base model's k most
likely next tokens and their log-probs. Each tuned model is then scored alone. What the cache
drops is the base's tail: the distribution of its remaining mass m over the other V - k tokens.
Two bounds hold for any tail consistent with the cache:

- lower: treat the tail as one outcome (a coarse-graining, so by the data-processing inequality
  it can only lose KL): sum_topk p log(p/q) + m log(m / q_tail).
- upper: the tail term sum_tail x log(x/q) is convex in the unknown tail x, with 0 <= x_v <= p_k
  (no tail token beats the k-th cached one) and sum x = m. Its maximum sits at a vertex: mass
  p_k on the tokens the tuned model finds least likely, the remainder on the next one.

With k = V the two bounds meet and equal the exact KL.
"""

from __future__ import annotations

import math

import torch


def base_topk(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids), each [n, min(k, V)], of base log-probs [n, V], in decreasing order."""
    values, ids = logprobs.float().topk(min(k, logprobs.shape[-1]), dim=-1)
    return values, ids


def _xlogy_ratio(x: torch.Tensor, log_x: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """x * (log x - log q), taken as 0 where x == 0."""
    return torch.where(x > 0, x * (log_x - log_q), torch.zeros_like(x))


def kl_bounds(base_values: torch.Tensor, base_ids: torch.Tensor, tuned_logprobs: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) bounds on KL(base || tuned) per token, each [n].

    base_values, base_ids: [n, k] from `base_topk`; tuned_logprobs: [n, V] log-softmax.
    The [n, V] work (the tail's mass, the least likely tail tokens) runs in the tuned log-probs'
    own precision (float32 from a model: several times faster than float64, and as exact as the
    log-softmax it reads); the per-token sums over the head and the chosen tail are float64.
    """
    p_log = base_values.double()
    p = p_log.exp()
    q_log = tuned_logprobs.gather(-1, base_ids).double()
    head = _xlogy_ratio(p, p_log, q_log).sum(-1)
    k, vocab = base_ids.shape[-1], tuned_logprobs.shape[-1]
    if k >= vocab:
        return head, head
    mass = (1.0 - p.sum(-1)).clamp(min=0.0)  # [n] base tail mass
    tail_log = tuned_logprobs.scatter(-1, base_ids, float("-inf"))  # tuned log-probs, head removed
    q_tail_log = torch.logsumexp(tail_log, -1).double().clamp(min=math.log(torch.finfo(torch.float64).tiny))
    lower = head + _xlogy_ratio(mass, mass.clamp(min=1e-300).log(), q_tail_log)
    return lower, head + _tail_upper(mass, p[:, -1], tail_log)


def _tail_upper(mass: torch.Tensor, cap: torch.Tensor, tail_log: torch.Tensor) -> torch.Tensor:
    """max sum_v x_v log(x_v / q_v) over 0 <= x_v <= cap, sum x = mass; [n].

    tail_log: [n, V] tuned log-probs with the head at -inf (never chosen: x there would be 0,
    and a tail token of probability 0 is skipped likewise).
    """
    n_full = torch.floor(mass / cap).long()  # tokens that take the whole cap
    n_tail = int((tail_log > float("-inf")).sum(-1).min())
    need = min(int(n_full.max()) + 1, n_tail)
    excluded = tail_log.masked_fill(tail_log == float("-inf"), float("inf"))
    order = excluded.topk(need, dim=-1, largest=False).indices
    log_q = tail_log.gather(-1, order).double()  # [n, need]: the least likely tail tokens, ascending
    ranks = torch.arange(need, device=mass.device)[None, :]
    x = torch.where(ranks < n_full[:, None], cap[:, None], torch.zeros_like(log_q))
    remainder = (mass - n_full.double() * cap).clamp(min=0.0)
    x = torch.where(ranks == n_full[:, None], remainder[:, None], x)
    return _xlogy_ratio(x, x.clamp(min=1e-300).log(), log_q).sum(-1)
