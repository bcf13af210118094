"""Per-example weights on the task loss (`train.example_weights`). `flow`: FLOW, Sanyal et al.,
"Upweighting Easy Samples in Fine-Tuning Mitigates Forgetting" (ICML 2025).

Each training example i is weighted by how easy the base finds it: w_i = exp(-L_i / tau), L_i the
base's mean NLL per completion token on the example, tau the median of the L_i (the paper's
temperature, and its default; `train.flow_temperature` sets it). An example the base already
predicts needs little change to fit, so it keeps its pull; one the base finds hard would pull the
weights far and is damped: the median example gets e^-1 of the easiest one's weight, an example at
three medians e^-3. The weights are then scaled to mean 1 over the training set. The paper's
code leaves them in (0, 1]; under AdamW a constant factor on the loss barely changes a step, but it
would change the share of every penalty in the loss, so at mean 1 a penalty weight means what it
means in the unweighted baseline.

The weighted task loss multiplies each completion token's loss by its example's weight and is
normalised like the plain task loss, by the count of label tokens (`weighted_token_mean`), not
by the sum of weights: all weights 1 is plain training exactly.

The losses are computed once before LoRA is applied (`base_generation.base_for_generation`), with no
grad, through `scoring.tokens.token_logprobs` (the head a chunk of positions at a time, each rank a
share under a multi-process launch), and cached under `<cache>/example_weights/`, keyed by the base
fingerprint and the training set's tokens (`scoring.base_cache`: sealed, written under a lock).
"""

from __future__ import annotations

import time

import torch

from workbench.config.sections import TrainSection
from workbench.data.examples import EXAMPLE_WEIGHT, TrainData, data_fingerprint
from workbench.errors import UsageError
from workbench.io import cache_dir
from workbench.scoring.base_cache import BaseCache
from workbench.scoring.tokens import token_logprobs
from workbench.training.base_generation import base_for_generation

COMPONENT = "base_losses"


def flow_weights(losses: torch.Tensor, temperature: float | None = None) -> tuple[torch.Tensor, float]:
    """(weights [N] float64 with mean 1, tau) for base losses [N]: w_i proportional to exp(-L_i / tau),
    tau = `temperature`, or the median of the losses (numpy's: the mean of the middle two for even N).

    exp(-(L_i - min L) / tau): the shift cancels in the normalisation and keeps every weight from
    underflowing to 0 unless its loss is 745 tau above the easiest; equal losses give weights of 1
    exactly."""
    losses = losses.double()
    tau = float(losses.quantile(0.5)) if temperature is None else float(temperature)
    if not tau > 0:
        raise UsageError(f"train.example_weights flow: the median base loss is {tau:g} nats per token, so it "
                         "cannot be the temperature; set train.flow_temperature")
    raw = torch.exp(-(losses - losses.min()) / tau)
    return raw / raw.mean(), tau


def weighted_token_mean(per_token_loss: torch.Tensor, mask: torch.Tensor, example_weight: torch.Tensor | None,
                        num_items: int | float | torch.Tensor) -> torch.Tensor:
    """sum_{b,t} mask[b,t] * w[b] * loss[b,t] / num_items: per_token_loss [B, T], mask [B, T] (the
    positions that carry a label), example_weight [B] (None: all 1), num_items the label tokens the
    loss is normalised by (the whole accumulated batch's, as for the task loss). The reference the
    task loss under `train.example_weights` equals."""
    weighted = per_token_loss * mask
    if example_weight is not None:
        weighted = weighted * example_weight.to(per_token_loss.dtype)[:, None]
    return weighted.sum() / num_items


def base_losses(model, examples: list[dict], batch_size: int, pad_id: int) -> torch.Tensor:
    """[N] float64: the model's mean NLL per label token on each example (0 for one with no scored
    token: it has no token to weight)."""
    rows = token_logprobs(model, examples, batch_size, pad_id, desc="base losses")
    return torch.stack([-row.mean() if len(row) else torch.zeros((), dtype=torch.float64) for row in rows])


def losses_for(model, examples: list[dict], base_fingerprint: str, batch_size: int, pad_id: int
               ) -> tuple[torch.Tensor, dict]:
    """The base's losses on `examples` from the cache or computed now (on the base, with no grad)
    and cached, and where they came from for run.json."""
    cache = BaseCache(base_fingerprint, root=cache_dir() / "example_weights")
    key = (data_fingerprint(examples),)
    began = time.perf_counter()

    def compute() -> dict[str, torch.Tensor]:
        with base_for_generation(model) as base:
            return {"losses": base_losses(base, examples, batch_size, pad_id)}

    losses = cache.get(COMPONENT, key, compute)["losses"]
    return losses, {"cached": bool(cache.hits), "path": str(cache.path(COMPONENT, *key)),
                    "seconds": round(time.perf_counter() - began, 2)}


def _summary(values: torch.Tensor) -> dict:
    return {"min": float(values.min()), "median": float(values.quantile(0.5)), "max": float(values.max())}


def with_example_weights(data: TrainData, model, cfg: TrainSection, base_fingerprint: str, pad_id: int
                         ) -> TrainData:
    """Every training example with its `example_weight` under `cfg.example_weights` (the whole set
    the trainer draws from, replay included), and the stats with the weights' summary."""
    if cfg.example_weights == "none":
        return data
    losses, record = losses_for(model, data.train, base_fingerprint, cfg.batch_size, pad_id)
    weights, tau = flow_weights(losses, cfg.flow_temperature)
    train = [{**example, EXAMPLE_WEIGHT: w} for example, w in zip(data.train, weights.tolist())]
    stats = {**data.stats, "example_weights": {
        "rule": cfg.example_weights, "temperature": tau,
        "temperature_from": "median" if cfg.flow_temperature is None else "recipe",
        "weight": _summary(weights), "base_loss": _summary(losses.double()), **record}}
    return TrainData(train, data.val, stats)
