#!/usr/bin/env python
"""What each regularizer and each eval path costs, measured pair by pair against the plain
alternative a user would otherwise pick, on one machine in one run.

    python scripts/bench.py --quick --json bench.json     # <= 10 minutes on 2 CPU cores
    python scripts/bench.py                               # the full profile: bigger batches, more repeats
    python scripts/bench.py --head cpu-gemma3             # the fused head's step vs HF + PEFT, Gemma 3 270M

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

This script loads the model, runs the cases and prints the table; the cases are in
bench_cases.py, the timing, memory and settings in bench_measure.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

# OpenMP threads that spin while they wait make torch's CPU backward ~10x slower when another
# process holds a core (measured: 1.8 s vs 20 s per step on a shared 2-core machine). Both sides
# of every pair run under the same setting, so the ratios stay fair. Set before torch loads (the
# bench_* helpers below import it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the workbench package, run from anywhere
from bench_cases import bench_kl_memory, bench_multiple_choice, bench_perplexity, bench_training  # noqa: E402
from bench_head import HEAD_PRESETS, bench_head  # noqa: E402
from bench_measure import DEVICE, DTYPE, PRESETS, machine  # noqa: E402
from workbench.config.recipe import LoraSection, ModelSection  # noqa: E402
from workbench.modeling.load import apply_lora, load_model  # noqa: E402


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
    parser.add_argument("--head", choices=sorted(HEAD_PRESETS) + ["chunks"], help="only the fused loss head's "
                        "figures (bench_head.py), at this preset's models and sequence lengths; chunks: its "
                        "chunk size alone")
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
    models = ", ".join(HEAD_PRESETS[args.head].models) if args.head in HEAD_PRESETS else s.model
    print(f"bench: {machine()}; model {models}; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    if args.head:
        rows = bench_head(s, args.head)
        device = machine(HEAD_PRESETS[args.head].dtype if args.head in HEAD_PRESETS else DTYPE)
        info = {"device": device, "preset": args.head, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        rows = [{**r, **info} for r in rows]
        print(f"\n{datetime.now(timezone.utc):%Y-%m-%d}, {device}, head preset {args.head}, "
              f"{(time.perf_counter() - started) / 60:.1f} min\n")
        print_table(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
        return 0
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
