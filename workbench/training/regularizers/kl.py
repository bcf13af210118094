"""KL-to-base: keep the tuned model's next-token distribution close to the base's.

The reference is the same model with the adapter disabled, so no second copy is loaded. The
reference runs the decoder body only; the base LM head and both vocabulary-sized log-softmaxes are
applied one chunk of tokens at a time, and each chunk's gradient with respect to the tuned logits
is written, in closed form, into one buffer shaped like the logits, which backward hands on. So
the term's extra memory is that one gradient (which the task loss's backward allocates anyway)
plus O(chunk_size x vocab), and nothing is recomputed in backward.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from workbench.config.penalties import KLConfig
from workbench.training.regularizers.base import Penalty, register
from workbench.training.regularizers.closed_form import summed_by_chunk
from workbench.modeling.heads import output_head
from workbench.modeling.lora import as_base, unwrap_peft
from workbench.scoring.masks import next_token_mask


def _exact_chunk(z, ref_hidden, ref_head, direction, temperature):
    """KL summed over a chunk, and its gradient in the tuned logits z [n, V]. With q = softmax(z/t)
    the tuned distribution and p the base's:
      forward, KL(p || q):  (q - p) / t
      reverse, KL(q || p):  q * (log q - log p - KL(q || p)) / t"""
    log_q = F.log_softmax(z.div_(temperature), dim=-1)
    log_p = F.log_softmax(ref_head(ref_hidden).float().div_(temperature), dim=-1)
    if direction == "forward":  # log_p becomes the log ratio in place: 3 [n, V] tensors live, not 5
        p = log_p.exp()
        return torch.dot(p.reshape(-1), log_p.sub_(log_q).reshape(-1)), log_q.exp_().sub_(p).div_(temperature)
    q = log_q.exp()
    log_ratio = log_q.sub_(log_p)
    kl = (q * log_ratio).sum(-1, keepdim=True)
    return kl.sum(), log_ratio.sub_(kl).mul_(q).div_(temperature)


def _topk_chunk(z, values, ids, temperature):
    """KL(p~ || q) summed over a chunk, and its gradient in z: the base's cached top-k log-probs
    (values, ids) [n, k], completed with its tail mass m = 1 - sum(p_k) spread over the other
    tokens in the tuned model's proportions (m q_j / q_tail). This equals the top-k eval's lower
    bound (`scoring.topk_kl`: the tail as one outcome), and its gradient is (q - p~) / t."""
    log_q = F.log_softmax(z.div_(temperature), dim=-1)
    q = log_q.exp()
    p = values.float().exp()
    head = (p * (values.float() - log_q.gather(-1, ids))).sum()
    mass = (1.0 - p.sum(-1)).clamp(min=0.0)
    if ids.shape[-1] >= z.shape[-1]:  # the whole vocabulary: no tail (1 - sum p is rounding error)
        mass = torch.zeros_like(mass)
    q_tail = q.scatter(-1, ids, 0.0).sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
    tail = torch.where(mass > 0, mass * (mass.clamp(min=1e-30).log() - q_tail.log()), torch.zeros_like(mass))
    grad = q.mul_((1.0 - mass / q_tail)[:, None])  # off the top-k: q_j - m q_j / q_tail
    grad.scatter_(-1, ids, log_q.gather(-1, ids).exp() - p)  # on it: q_j - p_j
    return head + tail.sum(), grad.div_(temperature)


def chunked_kl(logits: torch.Tensor, ref_hidden: torch.Tensor, ref_head: Callable,
               mask: torch.Tensor, direction: str = "forward", temperature: float = 1.0,
               chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-token KL over the positions where `mask` is True, and their count.

    logits: [B, T, V] from the tuned model; ref_hidden: [B, T, H], turned into base logits by
    `ref_head` one chunk at a time; mask: [B, T] bool. Pass the whole logits tensor, not a slice
    of it: the gradient is then handed to it without a copy.
    """
    positions = mask.reshape(-1).nonzero().squeeze(1)
    total = summed_by_chunk(logits, positions, chunk_size, exact_term(ref_hidden, ref_head, direction, temperature))
    return total, positions.new_tensor(positions.numel())


def exact_term(ref_hidden: torch.Tensor, ref_head: Callable, direction: str = "forward",
               temperature: float = 1.0) -> Callable:
    """`_exact_chunk` as a per-chunk term (`training.head.TokenTerm`): the chunk's base logits are
    ref_head applied to its rows of ref_hidden [B, T, H] (or [B, T, V] with an identity head)."""
    hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    return lambda z, start, index: _exact_chunk(z, hidden.index_select(0, index), ref_head, direction, temperature)


def topk_term(values: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> Callable:
    """`_topk_chunk` as a per-chunk term: the cached rows start:start + n of values, ids [N, k]."""
    return lambda z, start, index: _topk_chunk(z, values[start:start + len(index)], ids[start:start + len(index)],
                                               temperature)


def cached_topk_kl(logits: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   temperature: float = 1.0, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunked_kl` (forward direction) against a cached top-k of the base instead of a forward
    pass: values, ids [n, k] for the n positions where mask [B, T] is True, in row-major order."""
    positions = mask.reshape(-1).nonzero().squeeze(1)
    if values.shape[0] != positions.numel():
        raise ValueError(f"the reference cache has {values.shape[0]} positions for this batch, "
                         f"the batch {positions.numel()}")
    total = summed_by_chunk(logits, positions, chunk_size, topk_term(values, ids, temperature))
    return total, positions.new_tensor(positions.numel())


def reference_hidden(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, Callable]:
    """Final hidden states of the base model [B, T, H], and the base LM head to apply to them.

    When FSDP holds the LM head sharded (an FSDP 1 wrapper, or FSDP 2 after the root resharded;
    FSDP 2 otherwise keeps the root's parameters gathered after its forward), the head cannot be
    applied on its own: the reference is then the wrapped model's whole forward, base logits
    [B, T, V] (memory like the tuned logits'), with an identity head.
    """
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
    if _sharded(model):
        with as_base(model):
            return model(**inputs).logits, _identity
    with as_base(model) as peft_model:
        base = peft_model.get_base_model()
        hidden = base.get_decoder()(**inputs).last_hidden_state
    return hidden, output_head(base)  # with the base weights of a LoRA-wrapped head, and any soft cap


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _sharded(model: torch.nn.Module) -> bool:
    """FSDP 2 (the head's weight is a DTensor) or FSDP 1 (a FullyShardedDataParallel wrapper)."""
    from torch.distributed.tensor import DTensor

    if isinstance(unwrap_peft(model).get_base_model().get_output_embeddings().weight, DTensor):
        return True
    while type(model).__name__ != "FullyShardedDataParallel":
        if not hasattr(model, "module"):
            return False
        model = model.module
    return True


ERROR_CLIP = 0.2  # the relative error's bound, as Ziegler et al. (2019): one noisy step moves the weight little


def next_log_weight(log_weight: float, measured: float, target: float, gain: float,
                    weight_min: float, weight_max: float) -> float:
    """One step of the KL budget's controller (the adaptive KL coefficient of Ziegler et al. 2019,
    in log space): e = clip((measured - target) / target, -0.2, 0.2), log w + gain * e, clamped to
    [log weight_min, log weight_max]. log w sums the errors, so on the weight this is integral
    action: it settles where the KL meets the target on average, with no steady offset, and a
    step changes the weight by at most a factor exp(0.2 gain): 6% at the default gain 0.3."""
    error = min(max((measured - target) / target, -ERROR_CLIP), ERROR_CLIP)
    return min(max(log_weight + gain * error, math.log(weight_min)), math.log(weight_max))


@register
class KLToBase(Penalty):
    name = "kl_to_base"
    Config = KLConfig
    per_token = True

    def __init__(self, config: KLConfig, reference_cache=None, **_):
        """reference_cache: a `TopKReference` over the training set, needed by reference: topk_cache."""
        super().__init__(config)
        if config.reference == "topk_cache" and reference_cache is None:
            raise ValueError("kl_to_base with reference: topk_cache needs reference_cache=... "
                             "(see workbench.training.reference)")
        self.reference_cache = reference_cache if config.reference == "topk_cache" else None
        self.log_weight = math.log(config.weight) if config.target is not None else None

    def weight(self, step: int) -> float:
        if self.log_weight is not None:  # a target: the controller's weight (the config refuses warmup)
            return math.exp(self.log_weight)
        ramp = min(1.0, step / self.config.warmup_steps) if self.config.warmup_steps else 1.0
        return self.config.weight * ramp

    @property
    def controlled(self) -> bool:
        return self.log_weight is not None

    def update(self, measured: float) -> None:
        """`measured`: this step's KL per completion token, before the weight (see `Penalty.update`)."""
        if self.log_weight is not None:
            cfg = self.config
            self.log_weight = next_log_weight(self.log_weight, measured, cfg.target, cfg.target_gain,
                                              cfg.weight_min, cfg.weight_max)

    def state_dict(self) -> dict:
        return {} if self.log_weight is None else {"log_weight": self.log_weight}

    def load_state_dict(self, state: dict) -> None:
        if self.log_weight is not None:
            self.log_weight = float(state["log_weight"])

    def penalty(self, model, inputs, outputs) -> torch.Tensor:
        """Mean KL per completion token: positions t whose next-token label (t + 1) is not -100."""
        mask = next_token_mask(inputs["labels"])
        positions = mask.reshape(-1).nonzero().squeeze(1)
        total = summed_by_chunk(outputs.logits, positions, self.config.chunk_size, self.token_term(model, inputs))
        return total / max(positions.numel(), 1)

    def token_term(self, model, inputs):
        """The KL per chunk of tuned logits, against the base's forward on this batch (its decoder
        body; the base head runs per chunk) or the cached top-k rows of this batch's examples."""
        cfg = self.config
        if self.reference_cache is not None:
            positions = int(next_token_mask(inputs["labels"]).sum())
            values, ids = self.reference_cache.lookup(inputs["index"], inputs["labels"].device)
            if values.shape[0] != positions:
                raise ValueError(f"the reference cache has {values.shape[0]} positions for this batch, "
                                 f"the batch {positions}")
            return topk_term(values, ids, cfg.temperature)
        hidden, head = reference_hidden(model, inputs)
        return exact_term(hidden, head, cfg.direction, cfg.temperature)
