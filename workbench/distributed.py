"""Data-parallel helpers: start the process group early, know who writes, and split work that
every rank needs the whole of (eval scoring) across ranks.

Which rank this is comes from the launcher's environment, so commands that only read files
(`gate`, `recipes`, `--help`) ask it without importing torch; torch is imported where a
collective or a device is needed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Under `accelerate launch` with several processes, join the process group now.

    The Trainer would do it later; the Fisher estimation runs before the Trainer exists and
    needs the group to shard its reference data and all-reduce the sums.
    """
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def shutdown_distributed() -> None:
    """Wait for every rank, then tear the group down: a rank that exits while another still
    writes can abort inside gloo's background threads at interpreter exit."""
    if "torch" not in sys.modules:  # nothing imported torch, so no process group was started
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_device() -> torch.device:
    """This process's accelerator: its own GPU under a multi-process launch, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def gathered(params) -> contextlib.AbstractContextManager:
    """Under DeepSpeed ZeRO-3, the partitioned ones of `params` whole on every rank inside the block,
    to read and differentiate through (every rank must enter it: an all-gather). ZeRO-3 gathers a
    module's weights only around its own forward, so code that reads weights outside one (EWC and
    the delta L2 on the LoRA factors) needs it. Unpartitioned parameters: nothing happens."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]  # the mark ZeRO-3 puts on what it partitions
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def my_share(items: list[T]) -> list[T]:
    """This rank's contiguous share of `items` (all of them in one process): rank r of n gets
    items[len * r // n : len * (r + 1) // n], so shares differ in size by at most one."""
    n = _group_size()
    if n == 1:
        return items
    import torch.distributed as dist

    rank = dist.get_rank()
    return items[len(items) * rank // n:len(items) * (rank + 1) // n]


def shard_map(fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R]:
    """fn over this rank's contiguous share of `items`, the results of every rank gathered back
    in the original order on every rank. fn maps a list to one result per item and must accept
    an empty list. Contiguous shares keep neighbours together (a multiple-choice item's choices
    share a context). One process: fn(items)."""
    n = _group_size()
    if n == 1:
        return fn(items)
    import torch.distributed as dist

    local = fn(my_share(items))
    gathered: list = [None] * n
    dist.all_gather_object(gathered, local)
    return [result for part in gathered for result in part]


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every rank (a collective: every rank must call it)."""
    if _group_size() == 1:
        return flag
    import torch.distributed as dist

    flags: list = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return all(flags)
