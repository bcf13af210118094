"""Settings and measuring for scripts/bench.py: the presets, interleaved paired timing, peak
memory of one call, and one figure as a row.

Imported by bench.py after it has set the environment torch reads at load (OMP_WAIT_POLICY).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = "bfloat16" if DEVICE.type == "cuda" else "float32"
MB = 2**20


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2-135m-instruct"
    repeats: int = 7  # timed rounds per figure (medians of these)
    warmup: int = 2  # untimed rounds first
    batch_size: int = 8  # training batch: general text, the first quarter of each row masked
    seq_len: int = 128
    lora_r: int = 16  # LoRA on all linear layers, as the study's recipes
    learning_rate: float = 2e-3
    top_k: int = 256  # the reference cache keeps the base's top-k log-probs (the eval default)
    kl_seqs: tuple[int, int] = (1024, 4096)  # KL memory: a sequence, and a 4x longer one
    kl_chunk: int = 256  # several chunks even in the shorter sequence, so growth with T shows
    mc_task: str = "bigbench:movie_recommendation"  # or a local lm-eval task YAML
    mc_items: int = 40
    ppl_docs: int = 16
    ppl_chars: int = 1500  # each perplexity document: the first characters of a pydoc topic
    eval_batch_size: int = 8


PRESETS = {
    "full": Settings(),
    "quick": Settings(repeats=5, warmup=1, batch_size=4, seq_len=128, kl_seqs=(512, 2048), kl_chunk=128,
                      mc_items=16, ppl_docs=8, ppl_chars=1000),
    # for tests/test_bench.py only: seconds, a tiny random model, the shipped example task, no
    # download, one timed round; it checks the script runs, its figures mean nothing
    "smoke": Settings(model="tiny-random-llama", repeats=1, warmup=0, batch_size=2, seq_len=32, lora_r=4,
                      top_k=16, kl_seqs=(64, 256), kl_chunk=32,
                      mc_task=str(ROOT / "evals/tasks/capitals.yaml"), mc_items=8, ppl_docs=4, ppl_chars=200,
                      eval_batch_size=4),
}


# ------------------------------------------------------------------ measuring


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


Seconds = tuple[float, float]  # (wall clock, CPU time of this process: all its threads)


def clock() -> Seconds:
    sync()
    return time.perf_counter(), time.process_time()


def since(start: Seconds) -> Seconds:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int, seed: int = 0
                ) -> dict[str, list[Seconds]]:
    """Time per call of each alternative: `warmup` untimed rounds, then `repeats` timed rounds,
    every round calling each alternative once in a fresh random order."""
    rng = random.Random(seed)
    times: dict[str, list[Seconds]] = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        order = list(calls)
        rng.shuffle(order)
        for name in order:
            start = clock()
            calls[name]()
            if round_ >= warmup:
                times[name].append(since(start))
    return times


@contextlib.contextmanager
def quiet_fd2():
    """Silence file descriptor 2: the profiler's C++ side prints a line at every start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes torch allocated during fn(), above what was allocated when it started."""
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - before
    with quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                    key=lambda e: e["ts"])
    if not memory:
        return 0
    # "Total Allocated" is a process-wide counter that may start above 0; the first event's total
    # minus its own bytes is what was counted before fn() started.
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in memory) - start)


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(a: list[Seconds], b: list[Seconds], cpu: bool = False) -> float | None:
    """Median over rounds of b/a within a round: a load change between rounds (another job
    starting) moves both sides of a round, so it cancels, where a ratio of medians would not.
    cpu: of CPU times, which other jobs hardly touch (None on a GPU, where they mean nothing)."""
    if cpu and DEVICE.type == "cuda":
        return None
    return median([y[cpu] / x[cpu] for x, y in zip(a, b)])


def walls(times: list[Seconds]) -> list[float]:
    return [round(wall, 4) for wall, _ in times]


def row(name: str, compared: str, ratio: float, target: str | None, cpu_ratio: float | None = None,
        **extra) -> dict:
    """One figure: `target` is '<= x' (a cost ratio) or '>= x' (a speed-up), None when the issue
    sets none (`met` is None then); `met` judges the wall-clock `ratio`."""
    met = None
    if target is not None:
        op, bound = target.split()
        met = bool(ratio <= float(bound)) if op == "<=" else bool(ratio >= float(bound))
    return {"name": name, "compared": compared, "ratio": round(ratio, 4), "target": target, "met": met,
            "cpu_ratio": None if cpu_ratio is None else round(cpu_ratio, 4), **extra}


@contextlib.contextmanager
def timed(owner, method: str, seconds: list[Seconds]):
    """Add the time spent in `owner.method` (a class or an object) to `seconds`."""
    original = getattr(owner, method)

    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(since(start))

    setattr(owner, method, wrapper)
    try:
        yield
    finally:
        setattr(owner, method, original)


def machine(dtype: str = DTYPE) -> str:
    precision = "bf16" if dtype == "bfloat16" else "fp32"
    if DEVICE.type == "cuda":
        return f"{torch.cuda.get_device_name()}, {precision}"
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU, {precision}, " \
           f"torch threads {torch.get_num_threads()}"
