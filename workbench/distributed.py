"""Data-parallel helpers: start the process group early, and know who writes."""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Under `accelerate launch` with several processes, join the process group now.

    The Trainer would do it later; the Fisher estimation runs before the Trainer exists and
    needs the group to shard its reference data and all-reduce the sums.
    """
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def shutdown_distributed() -> None:
    """Wait for every rank, then tear the group down: a rank that exits while another still
    writes can abort inside gloo's background threads at interpreter exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
