"""KL-to-base: keep the tuned model's next-token distribution close to the base's.

The reference is the same model with the adapter disabled, so no second copy is loaded: its
decoder body runs once per micro-batch (`engine.base_reference`), and the base head and both
log-softmaxes run one chunk at a time inside the loss engine (`terms.kl_term`), with the
gradient in closed form. Or the reference is a top-k cache of the base's log-probs over the
training set (`reference: topk_cache`, `training.reference`), and no base forward runs at all.
A target KL turns the weight into a controller's output (`next_log_weight`).
"""

from __future__ import annotations

import math

from workbench.config.penalties import KLConfig
from workbench.scoring.masks import next_token_mask
from workbench.training.regularizers.base import Penalty, register
from workbench.training.terms import TRAIN_KL, kl_term, topk_kl_term


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
        """reference_cache: a `TopKReference` over the training set (`needs`: reference: topk_cache)."""
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

    @classmethod
    def needs(cls, config: KLConfig) -> tuple[str, ...]:
        return ("reference_cache",) if config.reference == "topk_cache" else ()

    @property
    def monitors(self) -> frozenset[str]:
        cfg = self.config
        same = (cfg.reference, cfg.direction, cfg.temperature) == ("model", "forward", 1.0)
        return frozenset({TRAIN_KL}) if same else frozenset()

    def term(self, model, inputs, base):
        """The KL per chunk of tuned logits, against the base's side of this batch (`base()`) or
        the cached top-k rows of this batch's examples."""
        cfg = self.config
        if self.reference_cache is not None:
            positions = int(next_token_mask(inputs["labels"]).sum())
            values, ids = self.reference_cache.lookup(inputs["index"], inputs["labels"].device)
            if values.shape[0] != positions:
                raise ValueError(f"the reference cache has {values.shape[0]} positions for this batch, "
                                 f"the batch {positions}")
            return topk_kl_term(values, ids, cfg.temperature)
        return kl_term(*base(), cfg.direction, cfg.temperature)
