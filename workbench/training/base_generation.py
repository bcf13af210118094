"""Generation with the base model before training, shared by base-sample replay and self-distillation.

Both generate once, before LoRA is applied (the same weights `as_base` sees later), in chunks whose
random stream depends on (stream name, seed, chunk) alone, so the rows are the same whatever the
number of processes. Under a multi-process launch each rank generates a contiguous share of the
chunks and the rows are gathered on every rank (`shard_map`). Rows are cached under
`<cache>/<folder>/`, keyed by the base fingerprint and what the caller says they depend on, sealed
and written under a file lock (`scoring.base_cache`); a damaged entry is generated again, said in
one line.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, TypeVar

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from workbench.distributed import is_main_process, local_device, shard_map
from workbench.io import cache_dir, fingerprint
from workbench.modeling.lora import as_base
from workbench.scoring.base_cache import BaseCache, ragged, unragged

T = TypeVar("T")


def chunk_seed(stream: str, seed: int, chunk: int) -> int:
    """The torch seed chunk `chunk` of `stream` is generated under: a hash of them, below 2**63."""
    return int(fingerprint(stream, seed, chunk), 16) % 2 ** 63


def tokenizer_fingerprint(tokenizer) -> str:
    """The vocabulary and special tokens: another tokenizer maps the same ids to other text."""
    return fingerprint(sorted(tokenizer.get_vocab().items()), tokenizer.bos_token_id, tokenizer.eos_token_id)


def cut_after_stop(row: list[int], stops: list[int]) -> list[int]:
    """A generated row up to and including its first stop token (generate pads finished rows after it)."""
    end = next((i for i, token in enumerate(row) if token in stops), None)
    return row if end is None else row[:end + 1]


@contextlib.contextmanager
def base_for_generation(model):
    """The base model in eval mode with no grad, on this process's accelerator: a PEFT model
    under `as_base` (adapter off), a plain one as it is. Its mode and device are restored after."""
    if isinstance(model, PeftModel):
        with as_base(model) as peft_model:
            yield peft_model
        return
    device, training = next(model.parameters()).device, model.training
    moved = device.type == "cpu" and local_device().type != "cpu"  # a 4-bit model is on its GPU already
    if moved:  # 135M parameters: 0.5 GB each way, against minutes of sampling on a CPU
        model.to(local_device())
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        if moved:
            model.to(device)
        model.train(training)


def generate_chunks(model, chunks: list[T], generate: Callable[[object, T], list[list[int]]],
                    desc: str) -> list[list[int]]:
    """generate(base, chunk) for every chunk, rows in chunk order, on every rank (each rank
    generating a contiguous share of the chunks)."""
    def share(mine: list[T]) -> list[list[list[int]]]:
        with base_for_generation(model) as base:
            return [generate(base, chunk) for chunk in tqdm(mine, desc=desc, disable=not is_main_process())]

    return [row for rows in shard_map(share, chunks) for row in rows]


def cached_rows(folder: str, component: str, base_fingerprint: str, key: tuple,
                compute: Callable[[], list[list[int]]]) -> tuple[list[list[int]], dict]:
    """Rows of token ids from `<cache>/<folder>/`, else computed now and cached, and the entry's
    record for run.json: cached (whether it was read), path, seconds."""
    cache = BaseCache(base_fingerprint, root=cache_dir() / folder)
    began = time.perf_counter()
    tensors = cache.get(component, key, lambda: ragged([torch.tensor(row, dtype=torch.int32) for row in compute()]))
    rows = [r.tolist() for r in unragged(tensors["values"], tensors["offsets"])]
    return rows, {"cached": bool(cache.hits), "path": str(cache.path(component, *key)),
                  "seconds": round(time.perf_counter() - began, 2)}
