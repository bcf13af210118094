#!/usr/bin/env python
"""What each regularizer and each eval path costs, measured pair by pair against the plain
alternative a user would otherwise pick, on one machine in one run.

    python scripts/bench.py --quick --json bench.json     # <= 10 minutes on 2 CPU cores
    python scripts/bench.py                               # the full profile: bigger batches, more repeats

1. Training step time and peak memory: `RegularizedTrainer` with no penalty vs a plain HF
   `Trainer` on the same PEFT model and batch; then each regularizer on vs off.
2. KL memory: the peak memory of our chunked KL term vs a naive full-tensor KL, at a long
   sequence and the model's vocabulary, and how it grows with the sequence.
3. Eval throughput: multiple-choice and perplexity scoring, tokens/s, our scorer vs
   lm-evaluation-harness on the same model, task and batch size; the scores must be identical.

Timing: the alternatives are called in rounds, each round in a fresh random order (A, B, B, A,
...), after untimed warm-up rounds; a figure is the median over rounds of the ratio within a
round, so drift on a shared machine (another job starting) hits both sides alike.
Memory: on a GPU the CUDA allocator's peak; on CPU torch's profiler, whose memory events carry the
running total of bytes held by torch's CPU allocator, so the peak counts every tensor allocated
during the call (net of frees) and nothing allocated before it.
Runs on CPU in fp32, or on a GPU in bf16 when there is one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

# OpenMP threads that spin while they wait make torch's CPU backward ~10x slower when another
# process holds a core (measured: 1.8 s vs 20 s per step on a shared 2-core machine). Both sides
# of every pair run under the same setting, so the ratios stay fair. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workbench.data.examples import EXAMPLE_INDEX, IGNORE, Collator, general_text_examples
from workbench.evals.lmeval import run_lm_eval
from workbench.scoring.scorer import choice_outcome
from workbench.scoring.scorer import Request, Scorer
from workbench.evals.tasks import bigbench_mc, local_task
from workbench.scoring.tokens import token_logprobs
from workbench.scoring.topk_kl import kl_bounds
from workbench.modeling.load import apply_lora, load_model
from workbench.config.recipe import LoraSection, ModelSection
from workbench.training.reference import TopKReference, build_topk_reference
from workbench.training.regularizers import EWC, DeltaL2, EWCConfig, KLConfig, KLToBase, PenaltyConfig
from workbench.training.regularizers.kl import chunked_kl, reference_mode
from workbench.modeling.lora import lora_factors
from workbench.training.trainer import RegularizedTrainer

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


# ------------------------------------------------------------------ 1. training steps


def training_batch(tokenizer, s: Settings) -> dict[str, torch.Tensor]:
    """General text rows of seq_len tokens; the first quarter of each is prompt (labels -100)."""
    examples = general_text_examples("builtin:pydoc", tokenizer, s.seq_len, s.batch_size, seed=0)
    for example in examples:
        example["labels"][: s.seq_len // 4] = [IGNORE] * (s.seq_len // 4)
    batch = Collator(tokenizer.pad_token_id)(examples)
    return {k: v.to(DEVICE) for k, v in batch.items()}


def random_fisher(model, estimator: str) -> dict[str, torch.Tensor]:
    """A Fisher of the right shapes for every LoRA module; its values do not change the cost."""
    gen = torch.Generator().manual_seed(0)
    fisher = {}
    for f in lora_factors(model):
        out_f, in_f = f.B.shape[0], f.A.shape[1]
        if estimator == "diag":
            fisher[f"{f.key}.diag"] = torch.rand(out_f, in_f, generator=gen)
        else:
            fisher[f"{f.key}.g"] = torch.rand(out_f, generator=gen)
            fisher[f"{f.key}.a"] = torch.rand(in_f, generator=gen)
    return {k: v.to(DEVICE) for k, v in fisher.items()}


def train_step(trainer: Trainer, batch: dict, n_items: torch.Tensor) -> None:
    """One optimiser step as the HF Trainer's inner loop takes it (one micro-batch, logged)."""
    model = trainer.model
    loss = trainer.training_step(model, batch, n_items)
    grad_norm = trainer._get_grad_norm(model, trainer._clip_grad_norm(model))
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    trainer.state.global_step += 1
    trainer.log({"loss": loss.item(), "grad_norm": float(grad_norm)})


def make_trainer(cls, model, tokenizer, s: Settings, output_dir: str, penalties=(), **args) -> Trainer:
    arguments = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=s.batch_size, learning_rate=s.learning_rate,
        lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0, logging_steps=1, report_to=[],
        use_cpu=DEVICE.type == "cpu", bf16=DEVICE.type == "cuda", remove_unused_columns=False,
        disable_tqdm=False, save_strategy="no", **args)  # tqdm on: no bar outside train(), no log lines
    extra = {"penalties": list(penalties)} if cls is RegularizedTrainer else {}
    with contextlib.redirect_stdout(io.StringIO()):  # our trainer prints its weight-decay groups
        trainer = cls(model=model, args=arguments, data_collator=Collator(tokenizer.pad_token_id),
                      processing_class=tokenizer, **extra)
        trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1  # set by the train loop, which we drive by hand
    return trainer


def bench_training(model, tokenizer, s: Settings) -> list[dict]:
    batch = training_batch(tokenizer, s)
    mask = batch["labels"][:, 1:] != IGNORE
    n_items = mask.sum()
    # the reference cache over this batch's examples, built once as `workbench train` builds it
    examples = [{k: v[b].tolist() for k, v in batch.items()} for b in range(s.batch_size)]  # unpadded rows
    reference = TopKReference(**build_topk_reference(model, [{**ex, EXAMPLE_INDEX: b} for b, ex in enumerate(
        examples)], Collator(tokenizer.pad_token_id), s.top_k, 1.0, s.batch_size))
    indexed = {**batch, EXAMPLE_INDEX: torch.arange(s.batch_size, device=DEVICE)}
    ewc = {estimator: EWC(EWCConfig(weight=100.0, estimator=estimator), fisher=random_fisher(model, estimator))
           for estimator in ("kfac_diag", "diag")}
    configs = {  # name: (trainer class, penalties, TrainingArguments overrides)
        "hf_trainer_peft": (Trainer, [], {}),
        "no_regularizer": (RegularizedTrainer, [], {}),
        "kl_to_base": (RegularizedTrainer, [KLToBase(KLConfig(weight=0.1))], {}),
        "ewc_kfac_diag": (RegularizedTrainer, [ewc["kfac_diag"]], {}),
        "ewc_diag": (RegularizedTrainer, [ewc["diag"]], {}),
        "delta_l2": (RegularizedTrainer, [DeltaL2(PenaltyConfig(weight=1.0))], {}),
        "label_smoothing": (RegularizedTrainer, [], {"label_smoothing_factor": 0.1}),
        "kl_topk_cache": (RegularizedTrainer, [KLToBase(KLConfig(weight=0.1, reference="topk_cache",
                                                                 top_k=s.top_k), reference_cache=reference)], {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_trainer(cls, model, tokenizer, s, tmp, penalties, **args)
                    for name, (cls, penalties, args) in configs.items()}
        steps = {name: (lambda t=t, b=indexed if name == "kl_topk_cache" else batch: train_step(t, b, n_items))
                 for name, t in trainers.items()}
        print(f"  timing {len(steps)} step kinds x {s.repeats} rounds ...", file=sys.stderr, flush=True)
        times = interleaved(steps, s.repeats, s.warmup)
        print("  peak memory of one step each ...", file=sys.stderr, flush=True)
        peaks = {name: peak_memory(step) for name, step in steps.items()}
    values, ids = reference.lookup(torch.arange(s.batch_size), DEVICE)
    kl_error = topk_kl_error(model, batch, mask, values, ids)

    def pair(name: str, baseline: str, target: str | None, **extra) -> dict:
        a, b = walls(times[baseline]), walls(times[name])
        return row(name, f"{name} vs {baseline}", paired_ratio(times[baseline], times[name]), target,
                   cpu_ratio=paired_ratio(times[baseline], times[name], cpu=True), unit="s/step",
                   a=round(median(a), 4), b=round(median(b), 4), a_times=a, b_times=b,
                   round_ratios=[round(y / x, 3) for x, y in zip(a, b)],
                   peak_mb_a=round(peaks[baseline] / MB, 1), peak_mb_b=round(peaks[name] / MB, 1), **extra)

    return [
        pair("no_regularizer", "hf_trainer_peft", "<= 1.03"),
        pair("kl_to_base", "no_regularizer", "<= 1.45"),
        pair("ewc_kfac_diag", "no_regularizer", "<= 1.05"),
        pair("ewc_diag", "no_regularizer", None),
        pair("delta_l2", "no_regularizer", "<= 1.02"),
        pair("label_smoothing", "no_regularizer", "<= 1.03"),
        pair("kl_topk_cache", "no_regularizer", "<= 1.15", **kl_error),
    ]


def topk_kl_error(model, batch: dict, mask: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> dict:
    """Mean KL(base || tuned) per completion token, exact vs the top-k cache's bounds, on the
    benchmark batch after the steps above moved the adapter away from the base."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        was_training = model.training
        model.eval()
        log_q = F.log_softmax(model(**inputs).logits[:, :-1][mask].float(), dim=-1)
        model.train(was_training)
        with reference_mode(model) as peft_model:
            log_p = F.log_softmax(peft_model(**inputs).logits[:, :-1][mask].float(), dim=-1)
        exact = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean().item()
        lower, upper = (b.mean().item() for b in kl_bounds(values, ids, log_q))
    return {"kl_exact": exact, "kl_cache_lower": lower, "kl_cache_upper": upper,
            "kl_cache_rel_error": abs(lower - exact) / exact if exact > 0 else 0.0,
            "top_k": ids.shape[-1], "cache_bytes_per_token": ids.shape[-1] * (values.element_size() + 4)}


# ------------------------------------------------------------------ 2. KL memory


def naive_kl(logits: torch.Tensor, ref_hidden: torch.Tensor, head, mask: torch.Tensor) -> torch.Tensor:
    """What one would write without chunking: full [B, T, V] fp32 log-softmaxes of both models."""
    with torch.no_grad():
        log_p = F.log_softmax(head(ref_hidden).float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return (per_token * mask).sum() / mask.sum()


def kl_term_peaks(head: torch.nn.Linear, seq: int, chunk_size: int) -> dict[str, tuple[int, float]]:
    """{"ours"|"naive": (peak bytes, seconds)} of the KL term's forward and backward, given the
    tuned logits [1, seq, V] (from the model's forward, which the task loss needs anyway) and the
    base's final hidden states [1, seq, H], as `KLToBase.penalty` gets them."""
    dtype = head.weight.dtype
    logits = torch.randn(1, seq, head.out_features, device=DEVICE, dtype=dtype, requires_grad=True)
    ref_hidden = torch.randn(1, seq, head.in_features, device=DEVICE, dtype=dtype)
    mask = torch.ones(1, seq, dtype=torch.bool, device=DEVICE)
    mask[:, -1] = False  # the last position predicts nothing, as in KLToBase.penalty

    def ours():
        total, count = chunked_kl(logits, ref_hidden, head, mask, chunk_size=chunk_size)
        (total / count).backward()

    def naive():
        naive_kl(logits, ref_hidden, head, mask).backward()

    out = {}
    for name, fn in (("ours", ours), ("naive", naive)):
        logits.grad = None
        start = time.perf_counter()
        out[name] = (peak_memory(fn), time.perf_counter() - start)
    return out


def bench_kl_memory(model, s: Settings) -> list[dict]:
    config = model.get_base_model().config
    vocab, hidden = config.vocab_size, config.hidden_size
    dtype = getattr(torch, DTYPE)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=DEVICE, dtype=dtype).requires_grad_(False)
    measured = {seq: kl_term_peaks(head, seq, s.kl_chunk) for seq in s.kl_seqs}
    peaks = {(name, seq): m[name][0] for seq, m in measured.items() for name in m}
    seconds = {(name, seq): m[name][1] for seq, m in measured.items() for name in m}
    short, long = s.kl_seqs
    grad_bytes = {seq: seq * vocab * torch.finfo(dtype).bits // 8 for seq in s.kl_seqs}  # the logits' gradient
    extra = {seq: peaks["ours", seq] - grad_bytes[seq] for seq in s.kl_seqs}
    chunk_bytes = s.kl_chunk * vocab * 4
    common = {"unit": "MB", "vocab": vocab, "chunk_size": s.kl_chunk,
              "full_tensor_mb": {seq: round(grad_bytes[seq] / MB, 1) for seq in s.kl_seqs},  # one [T, V]
              "chunk_fp32_mb": round(chunk_bytes / MB, 1)}
    return [
        row("kl_memory_vs_naive", f"chunked KL vs naive full-tensor KL, T={long}",
            peaks["ours", long] / peaks["naive", long], None, a=round(peaks["naive", long] / MB, 1),
            b=round(peaks["ours", long] / MB, 1), seconds_a=round(seconds["naive", long], 2),
            seconds_b=round(seconds["ours", long], 2), **common),
        # Beyond the logits' gradient (which the task loss allocates anyway), a term bounded by its
        # chunk size keeps the same extra memory when the sequence grows 4x; O(T x V) grows 4x.
        row("kl_memory_growth", f"chunked KL extra memory, T={long} vs T={short}",
            extra[long] / max(extra[short], 1), "<= 1.25", a=round(extra[short] / MB, 1),
            b=round(extra[long] / MB, 1),
            extra_in_chunks=round(extra[long] / chunk_bytes, 2), **common),
    ]


# ------------------------------------------------------------------ 3. eval throughput


def mc_task_file(directory: Path, s: Settings) -> Path:
    """A local lm-eval task YAML both sides read: the shipped example, or BIG-bench items written out."""
    if not s.mc_task.startswith("bigbench:"):
        return Path(s.mc_task)
    items = bigbench_mc(s.mc_task.removeprefix("bigbench:"), limit=s.mc_items)
    (directory / "mc.jsonl").write_text("".join(
        json.dumps({"context": i.context, "choices": list(i.choices), "gold": i.gold}) + "\n" for i in items))
    config = {"task": "bench_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "mc.jsonl"}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
              "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": " ",
              "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    path = directory / "mc.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


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


def eval_rows(name: str, what: str, times: dict, scoring: dict, tokens: int, identical: bool,
              target: str | None = None, **extra) -> list[dict]:
    """Throughput ratios (ours / lm-eval, higher is better), end to end and scoring calls only."""
    common = {"unit": "tokens/s", "tokens": tokens, "identical_scores": bool(identical), **extra}
    out = []
    for suffix, how, seconds in (("", "task file to metrics", times),
                                 ("_scoring_only", "scoring calls only", scoring)):
        ours, theirs = seconds["ours"], seconds["lm_eval"]
        out.append(row(f"{name}{suffix}", f"{what}: ours vs lm-eval, {how}", paired_ratio(ours, theirs), target,
                       cpu_ratio=paired_ratio(ours, theirs, cpu=True), a=round(tokens / median(walls(theirs)), 1),
                       b=round(tokens / median(walls(ours)), 1), a_seconds=walls(theirs), b_seconds=walls(ours),
                       **common))
    return out


def bench_multiple_choice(model, tokenizer, s: Settings, directory: Path) -> list[dict]:
    from lm_eval.models.huggingface import HFLM

    path = mc_task_file(directory, s)
    scoring = {"ours": [], "lm_eval": []}
    results = {}

    def ours():
        items = local_task(path)
        scorer = Scorer(model, tokenizer, batch_size=s.eval_batch_size)
        requests = [Request(item.context, item.delimiter + choice) for item in items for choice in item.choices]
        with timed(scorer, "loglikelihood", scoring["ours"]):
            flat = np.array([r.logprob for r in scorer.loglikelihood(requests)])
        bounds = np.cumsum([0] + [len(item.choices) for item in items])
        results["ours"] = [choice_outcome(flat[bounds[i]:bounds[i + 1]], item.choices, item.gold)
                           | {"logprobs": flat[bounds[i]:bounds[i + 1]].tolist()} for i, item in enumerate(items)]

    def lm_eval():
        with timed(HFLM, "loglikelihood", scoring["lm_eval"]), contextlib.redirect_stderr(io.StringIO()):
            out = run_lm_eval(model, tokenizer, [str(path)], batch_size=s.eval_batch_size, samples=True)
        results["lm_eval"] = next(iter(out.values()))

    times = interleaved({"ours": ours, "lm_eval": lm_eval}, s.repeats, s.warmup)
    for side in scoring:
        del scoring[side][:s.warmup]
    mine, theirs = results["ours"], results["lm_eval"]
    scorer = Scorer(model, tokenizer)
    items = local_task(path)
    tokens = sum(len(c) + len(t) for item in items for choice in item.choices
                 for c, t in [scorer.encode(Request(item.context, item.delimiter + choice))])
    same = all((a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"]) for a, b in zip(theirs["samples"], mine))
    gap = max(abs(x - y) for a, b in zip(theirs["samples"], mine) for x, y in zip(a["logprobs"], b["logprobs"]))
    acc = {"ours": float(np.mean([r["acc"] for r in mine])), "lm_eval": theirs["acc"]}
    acc_norm = {"ours": float(np.mean([r["acc_norm"] for r in mine])), "lm_eval": theirs["acc_norm"]}
    identical = same and acc["ours"] == acc["lm_eval"] and acc_norm["ours"] == acc_norm["lm_eval"]
    return eval_rows("mc_eval", f"multiple choice ({len(items)} items, {sum(len(i.choices) for i in items)} "
                     "requests)", times, scoring, tokens, identical, ">= 2.0", acc=acc, acc_norm=acc_norm,
                     max_abs_logprob_diff=gap, task=s.mc_task)


def perplexity_docs(s: Settings) -> list[str]:
    from pydoc_data.topics import topics

    texts = [topics[key][:s.ppl_chars] for key in sorted(topics) if len(topics[key]) >= s.ppl_chars]
    return texts[:s.ppl_docs]


def bench_perplexity(model, tokenizer, s: Settings, directory: Path) -> list[dict]:
    """Log-likelihood of whole documents: lm-eval's `loglikelihood_rolling` (one window per
    document, scored after its prefix token) vs our `token_logprobs` on [our scorer's prefix
    token] + the document's tokens."""
    from lm_eval.models.huggingface import HFLM

    docs = perplexity_docs(s)
    (directory / "ppl.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = {"task": "bench_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "ppl.jsonl"}},
              "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
              "doc_to_target": "text", "metric_list": [{"metric": "word_perplexity"},
                                                       {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}]}
    path = directory / "ppl.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    prefix = Scorer(model, tokenizer).prefix_token_id  # what our scorer puts before an empty context
    scoring = {"ours": [], "lm_eval": []}
    results = {}

    def ours():
        ids = [list(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs]
        examples = [{"input_ids": [prefix] + x, "labels": [IGNORE] + x} for x in ids]
        start = clock()
        rows = token_logprobs(model, examples, s.eval_batch_size, tokenizer.pad_token_id)
        scoring["ours"].append(since(start))
        loglik = [float(r.sum()) for r in rows]
        results["ours"] = {"word_perplexity": np.exp(-sum(loglik) / sum(len(re.split(r"\s+", d)) for d in docs)),
                           "byte_perplexity": np.exp(-sum(loglik) / sum(len(d.encode()) for d in docs)),
                           "tokens": sum(len(x) for x in ids)}

    def lm_eval():
        with timed(HFLM, "loglikelihood_rolling", scoring["lm_eval"]), contextlib.redirect_stderr(io.StringIO()):
            out = run_lm_eval(model, tokenizer, [str(path)], batch_size=s.eval_batch_size)
        results["lm_eval"] = out["bench_ppl"]

    model.eval()
    times = interleaved({"ours": ours, "lm_eval": lm_eval}, s.repeats, s.warmup)
    for side in scoring:
        del scoring[side][:s.warmup]
    mine, theirs = results["ours"], results["lm_eval"]
    rel = max(abs(mine[k] / theirs[k] - 1) for k in ("word_perplexity", "byte_perplexity"))
    prefixes = {"ours": prefix, "lm_eval": HFLM(pretrained=model, tokenizer=tokenizer).prefix_token_id}
    return eval_rows("ppl_eval", f"perplexity ({len(docs)} documents)", times, scoring, mine["tokens"], rel < 1e-5,
                     word_perplexity={"ours": float(mine["word_perplexity"]),
                                      "lm_eval": theirs["word_perplexity"]},
                     max_rel_perplexity_diff=rel, prefix_token_id=prefixes)


# ------------------------------------------------------------------ report


def machine() -> str:
    if DEVICE.type == "cuda":
        return f"{torch.cuda.get_device_name()}, bf16"
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU, fp32, " \
           f"torch threads {torch.get_num_threads()}"


def print_table(rows: list[dict]) -> None:
    print("| figure | compared | A (baseline) | B (ours) | ratio | target | met | CPU-time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        unit, cpu = r.get("unit", ""), r["cpu_ratio"]
        print(f"| {r['name']} | {r['compared']} | {r['a']:g} {unit} | {r['b']:g} {unit} | {r['ratio']:.3f} | "
              f"{r['target'] or '-'} | {met} | {'-' if cpu is None else f'{cpu:.3f}'} |")
    print("\nratio: B/A for step time and KL memory (lower is better); ours/lm-eval tokens/s for evals "
          "(higher is better); the median over rounds of the wall-clock ratio within a round (A, B: "
          "medians). CPU-time ratio: the same of this process's CPU time, which other jobs on the "
          "machine disturb far less than wall-clock time.\n")
    for r in rows:
        if "peak_mb_a" in r:
            print(f"- {r['name']}: step peak memory {r['peak_mb_a']:g} MB -> {r['peak_mb_b']:g} MB "
                  f"({r['peak_mb_b'] - r['peak_mb_a']:+.1f} MB)")
        if r["name"] == "kl_topk_cache":
            print(f"- kl_topk_cache (kl_to_base.reference: topk_cache): mean KL per token exact "
                  f"{r['kl_exact']:.4g}, cache lower bound {r['kl_cache_lower']:.4g} (what the step optimises, "
                  f"rel. error {r['kl_cache_rel_error']:.2%}), upper bound {r['kl_cache_upper']:.4g}")
        if r["name"] == "kl_memory_growth":
            print(f"- KL extra memory beyond the logits' gradient at the longer sequence: "
                  f"{r['extra_in_chunks']:g} x one fp32 chunk ({r['chunk_fp32_mb']:g} MB); one full "
                  f"[T, V] fp32 tensor: {r['full_tensor_mb']}")
        if r["name"] in ("mc_eval", "ppl_eval"):
            scores = {k: r[k] for k in ("acc", "acc_norm", "word_perplexity", "prefix_token_id") if k in r}
            print(f"- {r['name']}: identical scores: {r['identical_scores']} {scores}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the <= 10 minute profile (2 CPU cores)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, seconds; for tests only")
    parser.add_argument("--json", type=Path, help="write the figures as a JSON list to this file")
    parser.add_argument("--repeats", type=int, help="timed rounds per figure (at least 5)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    s = PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.repeats is not None:
        s = replace(s, repeats=args.repeats)
    if s.repeats < 5 and not args.smoke:
        parser.error("--repeats: at least 5")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    print(f"bench: {machine()}; model {s.model}; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    with contextlib.redirect_stderr(io.StringIO()):
        model, tokenizer = load_model(ModelSection(name=s.model, dtype=DTYPE))
        model = apply_lora(model, LoraSection(r=s.lora_r, alpha=2.0 * s.lora_r), dropout=0.0).to(DEVICE)
    rows = []

    def section(title: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {title}", file=sys.stderr, flush=True)

    section("1. training steps")
    rows += bench_training(model, tokenizer, s)
    section("2. KL memory")
    rows += bench_kl_memory(model, s)
    with tempfile.TemporaryDirectory() as tmp:
        section("3a. multiple-choice eval")
        rows += bench_multiple_choice(model, tokenizer, s, Path(tmp))
        section("3b. perplexity eval")
        rows += bench_perplexity(model, tokenizer, s, Path(tmp))
    elapsed = time.perf_counter() - started
    info = {"device": machine(), "model": s.model, "settings": asdict(s),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    rows = [{**r, **info} for r in rows]
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d}, {machine()}, model {s.model}, "
          f"{s.repeats} timed rounds (medians), {elapsed / 60:.1f} min, load average at the end "
          f"{os.getloadavg()[0]:.2f}\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
