"""Self-distillation fine-tuning (`data.self_distill`, SDFT): before training, the base rewrites each
training completion in its own words from a prompt that shows it the reference, and the fine-tune
learns the rewrites. Text the base itself would write sits close to its own distribution, so
fitting it moves the model less than fitting the references (Yang et al. 2024).

The rewrites are generated once, before LoRA is applied (the base's weights), in chunks of
GENERATE_BATCH prompts, longest first; at temperature > 0 chunk c samples under a seed hashed from
(seed, c), so the rewrites are the same whatever the number of processes, and under a
multi-process launch each rank rewrites its share of the chunks once (`training.base_generation`).
They are cached under `<cache>/self_distill/`, keyed by the base fingerprint, the settings, the
tokenizer and the rewrite prompts (the template, the chat template and the data); which of them are
kept (`data.self_distill`) is decided after the cache, so changing it generates nothing.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from workbench.config.recipe import Recipe
from workbench.config.self_distill import SelfDistill
from workbench.data.examples import TrainData, build_datasets
from workbench.data.self_distill import distilled, rewrite_prompt, stop_ids
from workbench.distributed import is_main_process
from workbench.errors import UsageError
from workbench.io import fingerprint
from workbench.scoring.masks import pad_rows
from workbench.training.base_generation import (
    cached_rows, chunk_seed, cut_after_stop, generate_chunks, tokenizer_fingerprint
)

# Prompts per generate call; part of the cache key, since at temperature > 0 a chunk's rows share one
# random stream. Prompts are sorted longest first so a chunk's left padding stays short.
GENERATE_BATCH = 16
COMPONENT = "rewrites"


def settings(cfg: SelfDistill) -> dict:
    """What the rewrites depend on beside the base, the tokenizer and the prompts (recorded in run.json)."""
    return {**cfg.model_dump(include={"template", "max_new_tokens", "temperature", "seed"}),
            "generate_batch": GENERATE_BATCH}


def rewrite_chunk(model, tokenizer, cfg: SelfDistill, chunk: int, prompts: list[list[int]],
                  stops: list[int]) -> list[list[int]]:
    """The new tokens of each prompt, left-padded into one batch, cut after the first stop token."""
    ids, mask = pad_rows(prompts, tokenizer.pad_token_id, side="left")
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": 0, "top_p": 1.0} \
        if cfg.temperature > 0 else {"do_sample": False}
    # a fresh config: the model's own generation_config.json (top_k 50, a repetition penalty) stays out
    config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, num_beams=1, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=stops, **sampling)
    torch.manual_seed(chunk_seed("self_distill", cfg.seed, chunk))  # seeds CUDA too
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return [cut_after_stop(row[ids.shape[1]:], stops) for row in out.cpu().tolist()]


def generate_rewrites(model, tokenizer, cfg: SelfDistill, prompts: list[list[int]]) -> list[list[int]]:
    """Every prompt's rewrite (new tokens), in the prompts' order, on every rank."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    chunks = [(c, order[start:start + GENERATE_BATCH]) for c, start in enumerate(range(0, len(order), GENERATE_BATCH))]
    stops = stop_ids(tokenizer)
    rows = generate_chunks(model, chunks, lambda base, chunk: rewrite_chunk(
        base, tokenizer, cfg, chunk[0], [prompts[i] for i in chunk[1]], stops), "self-distill rewrites")
    out: list[list[int]] = [[] for _ in prompts]
    for i, row in zip(order, rows):
        out[i] = row
    return out


def rewrites_for(model, tokenizer, cfg: SelfDistill, prompts: list[list[int]], base_fingerprint: str
                 ) -> tuple[list[list[int]], dict]:
    """The rewrites from the cache or generated now and cached, and the entry's record."""
    key = (settings(cfg), tokenizer_fingerprint(tokenizer), fingerprint(prompts))
    return cached_rows("self_distill", COMPONENT, base_fingerprint, key,
                       lambda: generate_rewrites(model, tokenizer, cfg, prompts))


def self_distilled(recipe: Recipe, tokenizer, model, base_fingerprint: str) -> TrainData:
    """The recipe's datasets with each training completion replaced by the base's rewrite where it
    is kept; the stats carry `self_distill`: the counts, the cache entry and the settings."""
    cfg, record = recipe.data.self_distill, {}
    stops = stop_ids(tokenizer)

    def rewrite(records: list[dict], names: list[str]) -> list[dict | None]:
        prompts = [rewrite_prompt(tokenizer, cfg.template, r, where) for r, where in zip(records, names)]
        rows, entry = rewrites_for(model, tokenizer, cfg, prompts, base_fingerprint)
        texts = [(tokenizer.decode([t for t in row if t not in stops], skip_special_tokens=True),
                  bool(row) and row[-1] in stops) for row in rows]
        out, counts = distilled(records, texts, cfg)
        if counts["kept"] == 0 and cfg.rejected == "drop":
            raise UsageError(f"{recipe.data.train}: data.self_distill kept none of the {len(records)} rewrites "
                             f"({counts['dropped_by']}) and rejected is drop: nothing is left to train on")
        record.update(counts, tokens=sum(len(r) for r in rows), **entry, settings=settings(cfg))
        return out

    data = build_datasets(recipe.data, tokenizer, recipe.train.seed, rewrite)
    if is_main_process():
        how = "cached" if record["cached"] else f"generated in {record['seconds']} s"
        print(f"self-distill: {record['kept']} of {record['n_records']} rewrites kept, {record['dropped']} "
              f"{'fall back to the reference' if cfg.rejected == 'original' else 'dropped'} "
              f"({', '.join(f'{k} {v}' for k, v in record['dropped_by'].items() if v) or 'none'}), "
              f"{how}: {record['path']}")
    return TrainData(data.train, data.val, {**data.stats, "self_distill": record})
