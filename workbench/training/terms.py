"""The per-token terms of training, each as a function over one chunk of tuned logits that returns
its value summed over the chunk and its gradient in the logits, in closed form (`engine.TokenTerm`).

The task loss (NLL, label smoothing, DFT, each example optionally weighted) and the KL to the base
(exact against the base's forward, or against a cached top-k of it) are all of this one kind, so
the loss engine (`training.engine`) runs them together, one chunk of positions at a time.

DFT (dynamic fine-tuning, Wu et al. 2025; TRL's `loss_type="dft"`) writes the SFT gradient as a
policy gradient whose implicit reward is 1 / p(y), which grows without bound on tokens the model
finds unlikely, and cancels it: each token's NLL is weighted by its own probability, detached,
loss_t = -sg(p_t(y_t)) log p_t(y_t), so a token the base finds unlikely pulls the weights less than
under plain NLL. With KL-to-base on, DFT plus the KL term is anchored SFT (ASFT).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

from workbench.scoring.masks import shifted_labels

TaskLoss = Literal["nll", "dft"]
TRAIN_KL = "retention_train_kl"  # the monitor: KL(base || tuned), exact, temperature 1, per completion token

class Chunk:
    """One chunk of completion positions as every term sees it: z [n, V], the fp32 tuned logits
    (read only); start, its offset among the batch's completion positions (row-major, as
    mask.nonzero() lists them: a cached reference's rows); index [n], its flat positions in the
    [B*T] batch. `log_q()` is log_softmax(z), computed once for all the chunk's terms; the term
    called with `last` set is its final reader and may overwrite it."""

    def __init__(self, z: torch.Tensor, start: int, index: torch.Tensor):
        self.z, self.start, self.index, self.last = z, start, index, False
        self._log_q: torch.Tensor | None = None

    def log_q(self, temperature: float = 1.0) -> torch.Tensor:
        """log_softmax(z / temperature); at temperature 1 the shared one."""
        if temperature != 1.0:
            return F.log_softmax(self.z / temperature, dim=-1)
        if self._log_q is None:
            self._log_q = F.log_softmax(self.z, dim=-1)
        return self._log_q

    def q(self, log_q: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """exp(log_q) into log_q's own storage when this term may overwrite it, else new."""
        return log_q.exp_() if self.last or temperature != 1.0 else log_q.exp()


# term(chunk) -> (the term summed over the chunk, its gradient in z [n, V], a tensor the caller owns)
TokenTerm = Callable[[Chunk], tuple[torch.Tensor, torch.Tensor]]


def task_term(labels: torch.Tensor, loss: TaskLoss = "nll", smoothing: float = 0.0,
              example_weight: torch.Tensor | None = None) -> TokenTerm:
    """The task loss per chunk, labels [B, T] (unshifted). Per token, with q = softmax(z), y the label:
      nll, smoothing e:  value  -(1 - e) log q_y - (e / V) sum_v log q_v  (torch's cross_entropy)
                         grad   q - (1 - e) onehot(y) - e / V
      dft:               value  -sg(q_y) log q_y
                         grad   q_y (q - onehot(y))
    example_weight [B]: each token's value and gradient times its example's weight. Smoothing has
    no DFT form (it has no observed token to weight), so the recipe refuses the pair."""
    if loss == "dft" and smoothing:
        raise ValueError("label smoothing has no DFT form")
    targets = shifted_labels(labels).reshape(-1)
    width = labels.shape[1]

    def term(chunk):
        y = targets.index_select(0, chunk.index)[:, None]
        log_q = chunk.log_q()
        log_qy = log_q.gather(-1, y)
        if loss == "dft":
            qy = log_qy.exp()
            value = -(qy * log_qy)
            grad = chunk.q(log_q).scatter_add_(-1, y, torch.full_like(qy, -1.0)).mul_(qy)
        else:
            value = -(1.0 - smoothing) * log_qy
            if smoothing:
                value = value - smoothing / log_q.shape[-1] * log_q.sum(-1, keepdim=True)
            grad = chunk.q(log_q).scatter_add_(-1, y, torch.full_like(log_qy, smoothing - 1.0))
            if smoothing:
                grad.sub_(smoothing / log_q.shape[-1])
        if example_weight is not None:
            weight = example_weight.to(log_q.dtype).index_select(0, chunk.index // width)[:, None]
            value, grad = value * weight, grad.mul_(weight)
        return value.sum(), grad

    return term


def _exact_chunk(chunk, ref_rows, ref_head, direction, temperature):
    """KL summed over a chunk, and its gradient in the tuned logits z [n, V]. With q = softmax(z/t)
    the tuned distribution and p the base's:
      forward, KL(p || q):  (q - p) / t
      reverse, KL(q || p):  q * (log q - log p - KL(q || p)) / t"""
    log_q = chunk.log_q(temperature)
    # the base's logits live only inside this expression: held in a name, they would be one more
    # [n, V] tensor at the chunk's peak
    log_p = F.log_softmax(_scaled(ref_rows if ref_head is None else ref_head(ref_rows), temperature), dim=-1)
    if direction == "forward":  # log_p becomes the log ratio in place: 3 [n, V] tensors live, not 5
        p = log_p.exp()
        value = torch.dot(p.reshape(-1), log_p.sub_(log_q).reshape(-1))
        grad = chunk.q(log_q, temperature).sub_(p)
    else:
        q = log_q.exp()
        log_ratio = log_p.neg_().add_(log_q)
        kl = (q * log_ratio).sum(-1, keepdim=True)
        value, grad = kl.sum(), log_ratio.sub_(kl).mul_(q)
    return value, grad if temperature == 1.0 else grad.div_(temperature)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits.float() if temperature == 1.0 else logits.float() / temperature


def kl_term(ref: torch.Tensor, ref_head: Callable | None, direction: str = "forward",
            temperature: float = 1.0) -> TokenTerm:
    """KL between the tuned model and the base per chunk: the chunk's base logits are ref_head
    applied to its rows of ref [B, T, H] (the base's final hidden states), or those rows of ref
    [B, T, V] themselves (the base's logits) when ref_head is None."""
    flat = ref.reshape(-1, ref.shape[-1])

    def term(chunk):
        return _exact_chunk(chunk, flat.index_select(0, chunk.index), ref_head, direction, temperature)

    return term


def _topk_chunk(chunk, values, ids, temperature):
    """KL(p~ || q) summed over a chunk, and its gradient in z: the base's cached top-k log-probs
    (values, ids) [n, k], completed with its tail mass m = 1 - sum(p_k) spread over the other
    tokens in the tuned model's proportions (m q_j / q_tail). This equals the top-k eval's lower
    bound (`scoring.topk_kl`: the tail as one outcome), and its gradient is (q - p~) / t."""
    log_q = chunk.log_q(temperature)
    p = values.float().exp()
    log_q_ids = log_q.gather(-1, ids)
    head = (p * (values.float() - log_q_ids)).sum()
    q = chunk.q(log_q, temperature)
    mass = (1.0 - p.sum(-1)).clamp(min=0.0)
    if ids.shape[-1] >= q.shape[-1]:  # the whole vocabulary: no tail (1 - sum p is rounding error)
        mass = torch.zeros_like(mass)
    q_tail = q.scatter(-1, ids, 0.0).sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
    tail = torch.where(mass > 0, mass * (mass.clamp(min=1e-30).log() - q_tail.log()), torch.zeros_like(mass))
    grad = q.mul_((1.0 - mass / q_tail)[:, None])  # off the top-k: q_j - m q_j / q_tail
    grad.scatter_(-1, ids, log_q_ids.exp() - p)  # on it: q_j - p_j
    return head + tail.sum(), grad if temperature == 1.0 else grad.div_(temperature)


def topk_kl_term(values: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> TokenTerm:
    """Forward KL against the base's cached top-k per chunk: its rows start:start + n of
    values, ids [N, k] (one row per completion position of the batch, row-major)."""
    def term(chunk):
        rows = slice(chunk.start, chunk.start + len(chunk.index))
        return _topk_chunk(chunk, values[rows], ids[rows], temperature)

    return term
