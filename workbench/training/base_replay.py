"""Base-sample replay (`regularizers.base_replay`): text the base model samples from BOS, mixed into
every training batch and trained on with the task loss.

The NLL of the tuned model on samples x ~ p_base is E_base[-log p_tuned(x)] = H(p_base) +
KL(p_base || p_tuned) over whole sequences, so its gradient is that of the forward KL to the base
on the base's own distribution, estimated by sampling; no general-domain data is needed.

The pool is generated once, before LoRA is applied (the same weights as `as_base` sees), in chunks
of GENERATE_BATCH samples, chunk c seeded from (seed, c) alone: the pool is the same whatever the
number of processes (`training.base_generation`, shared with self-distillation). Entries are cached
under `<cache>/base_replay/`, keyed by the base fingerprint, the sampling settings and the tokenizer.
"""

from __future__ import annotations

import torch

from workbench.config.recipe import BaseReplay
from workbench.data.examples import TrainData
from workbench.data.mixing import MixedBatchSampler, replay_per_batch
from workbench.scoring.masks import IGNORE
from workbench.training.base_generation import (
    cached_rows, chunk_seed, cut_after_stop, generate_chunks, tokenizer_fingerprint
)

# Samples per generate call. Part of the cache key: a chunk's samples share one RNG stream, so
# another size draws other samples. 16 rows of 128 new tokens keep a 135M model's KV cache at
# about 30 MB. On 2 shared CPU cores the tiny model generates 64 samples of 32 tokens in 2.7 to
# 3.6 s, and SmolLM2-135M takes 2.3 s a step for 16 rows (332 s for a chunk of 128 tokens).
GENERATE_BATCH = 16
COMPONENT = "base_samples"


def start_ids(tokenizer, prefix: str) -> list[int]:
    """BOS then the prefix's tokens. A tokenizer with no BOS starts from EOS, the boundary after
    which a model trained on packed documents begins a new one."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [start] + list(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else [start]


def sampling_settings(cfg: BaseReplay) -> dict:
    """What the pool depends on beside the base and the tokenizer (recorded in run.json)."""
    return {**cfg.model_dump(exclude={"ratio"}), "top_k": 0, "generate_batch": GENERATE_BATCH}


def generate_chunk(model, tokenizer, cfg: BaseReplay, chunk: int, n: int) -> list[list[int]]:
    """`n` samples (start ids + new tokens, cut after eos) of chunk `chunk`, under its chunk_seed."""
    start = start_ids(tokenizer, cfg.prefix)
    device = next(model.parameters()).device
    input_ids = torch.tensor([start] * n, device=device)
    torch.manual_seed(chunk_seed("base_replay", cfg.seed, chunk))  # seeds CUDA too
    # top_k=0: the generation config's default (50) would cut the base's tail off
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                         temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return [start + cut_after_stop(row[len(start):], [tokenizer.eos_token_id]) for row in out.cpu().tolist()]


def generate_pool(model, tokenizer, cfg: BaseReplay) -> list[list[int]]:
    """Every sample of the pool, in chunk order, on every rank (each rank generates its share)."""
    chunks = [(c, min(GENERATE_BATCH, cfg.num_samples - c * GENERATE_BATCH))
              for c in range(-(-cfg.num_samples // GENERATE_BATCH))]
    return generate_chunks(model, chunks, lambda base, c: generate_chunk(base, tokenizer, cfg, *c), "base samples")


def pool_for(model, tokenizer, cfg: BaseReplay, base_fingerprint: str) -> tuple[list[list[int]], dict]:
    """The pool from the cache or generated now and cached, and its record for run.json."""
    rows, entry = cached_rows("base_replay", COMPONENT, base_fingerprint,
                              (sampling_settings(cfg), tokenizer_fingerprint(tokenizer)),
                              lambda: generate_pool(model, tokenizer, cfg))
    n_start = len(start_ids(tokenizer, cfg.prefix))
    record = {"num_samples": len(rows), "tokens": sum(len(r) - n_start for r in rows), **entry,
              "settings": sampling_settings(cfg)}
    return rows, record


def replay_examples(rows: list[list[int]], n_start: int, max_length: int) -> list[dict]:
    """Training examples from samples: the loss on every generated token (eos included), none on
    the start ids the model was given; cut to the recipe's max_length."""
    return [{"input_ids": row[:max_length], "attention_mask": [1] * len(row[:max_length]),
             "labels": ([IGNORE] * n_start + row[n_start:])[:max_length]} for row in rows]


def with_base_replay(data: TrainData, rows: list[list[int]], record: dict, tokenizer, cfg: BaseReplay,
                     max_length: int, batch_size: int) -> TrainData:
    """The training set as task examples then the pool, and the stats with the pool's record."""
    pool = replay_examples(rows, len(start_ids(tokenizer, cfg.prefix)), max_length)
    per_batch = replay_per_batch(cfg.ratio, batch_size)
    stats = {**data.stats, "n_train": len(data.train) + len(pool),
             "base_replay": {**record, "per_batch": per_batch, "batch_size": batch_size,
                             "n_task": len(data.train)}}
    return TrainData(data.train + pool, data.val, stats)


def use_mixed_batches(trainer, data: TrainData, ratio: float, seed: int) -> MixedBatchSampler:
    """Make the trainer draw its training batches from a MixedBatchSampler over `data`.

    transformers 5's Trainer asks `_get_train_sampler` for the sampler it builds the training
    DataLoader with (then accelerate shards it per rank); setting it on the instance keeps the
    RegularizedTrainer class, and whatever else subclasses it, as it is."""
    st = data.stats["base_replay"]
    sampler = MixedBatchSampler(st["n_task"], st["num_samples"], st["batch_size"],
                                replay_per_batch(ratio, st["batch_size"]), seed)
    trainer._get_train_sampler = lambda train_dataset=None: sampler
    return sampler
