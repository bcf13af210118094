"""The fused loss head's benchmark case for scripts/bench.py (`--head PRESET`): peak memory and
time of a training step, ours (the fused head) against a plain HF `Trainer` + PEFT on the same
model and batch, at several sequence lengths; plain vs KL-to-base vs EWC; and the general-text
eval's peak memory, ours against the whole logits. Each row's two sides run in the same process,
on the same batch, under the same gradient checkpointing.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer

from bench_cases import make_trainer, random_fisher, train_step, training_batch
from bench_measure import (
    DEVICE, DTYPE, MB, Settings, clock, interleaved, median, paired_ratio, peak_memory, row, since, walls
)
from workbench.config.recipe import LoraSection, ModelSection
from workbench.modeling.load import apply_lora, load_model
from workbench.scoring import general
from workbench.scoring.base_cache import BaseCache
from workbench.modeling.head import Head
from workbench.scoring.masks import next_token_mask
from workbench.training.engine import chunked_loss
from workbench.training.terms import task_term
from workbench.training.regularizers import EWC, EWCConfig, KLConfig, KLToBase
from workbench.training.trainer import RegularizedTrainer

# a randomly initialised Llama of about 1.2B parameters with Llama 3's 128k vocabulary (no download)
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False)


@dataclass(frozen=True)
class HeadSettings:
    models: tuple[str, ...]  # a named model ("smollm2-135m-instruct", "gemma3-270m") or "llama-1b" (LLAMA_1B)
    seqs: tuple[int, ...]  # step peak memory, ours (fused) vs HF, at each
    penalty_seqs: tuple[int, ...]  # also KL-to-base and EWC (fused), on the last model
    timed_seqs: tuple[int, ...]  # also step times, and today's full-logits path with and without the KL
    eval_seq: int | None  # None: no eval row
    layers: int | None = None  # LLAMA_1B with fewer layers (a machine too slow for 16)
    repeats: int = 5  # timed rounds per pair (medians)
    warmup: int = 1
    checkpointing: bool = True  # gradient checkpointing, both sides alike
    dtype: str = DTYPE  # the weights' dtype (bf16 on a GPU, fp32 on a CPU unless a preset says)
    full_path: bool = True  # at timed penalty lengths, also today's full-logits path (its KL holds ~5 [T, V] fp32)
    batch: int = 1  # rows of seq tokens per step


HEAD_PRESETS = {
    "full": HeadSettings(models=("smollm2-135m-instruct", "llama-1b"), seqs=(512, 2048, 4096),
                         penalty_seqs=(2048, 4096), timed_seqs=(512, 2048, 4096), eval_seq=4096),
    # the embedded default on 2 CPU cores: memory at every length, one timed round at 512 tokens
    "cpu": HeadSettings(models=("smollm2-135m-instruct",), seqs=(512, 2048, 4096), penalty_seqs=(512, 2048, 4096),
                        timed_seqs=(512,), eval_seq=4096, repeats=1, warmup=0),
    # step times alone at 512 tokens, 3 paired rounds after a warm-up
    "cpu-time": HeadSettings(models=("smollm2-135m-instruct",), seqs=(512,), penalty_seqs=(512,), timed_seqs=(512,),
                             eval_seq=None, repeats=3, warmup=1),
    # the 1B shape's head and embeddings (128k vocabulary, hidden 2,048) with 2 of its 16 layers: the
    # head's share of a step at full size, the decoder's activations 1/8 of it
    "cpu-1b": HeadSettings(models=("llama-1b",), seqs=(2048, 4096), penalty_seqs=(2048, 4096), timed_seqs=(),
                           eval_seq=None, layers=2),
    # the whole 1B model, all 16 layers, bf16 weights as on a GPU: memory at 2,048 and 4,096 tokens
    # (plain, KL, EWC), one timed round at 2,048 after the profiled step, the eval at 4,096
    "cpu-1b-bf16": HeadSettings(models=("llama-1b",), seqs=(2048, 4096), penalty_seqs=(2048, 4096),
                                timed_seqs=(2048,), eval_seq=4096, repeats=1, warmup=0, dtype="bfloat16"),
    # Gemma 3 270M (pretrained base, 262k vocabulary, tied head) at the study's lengths: max_length 64
    # (word_unscrambling) and 384 (GSM8K); memory of plain, KL and EWC, 3 paired rounds after a warm-up
    "cpu-gemma3": HeadSettings(models=("gemma3-270m",), seqs=(64, 384), penalty_seqs=(64, 384), timed_seqs=(64, 384),
                               eval_seq=None, repeats=3, warmup=1),
    # the same at 4,096 tokens, one timed round after the profiled step; without today's full-logits
    # path, whose exact KL would hold about 5 x 4 GiB [4,096, 262k] fp32 tensors on a 23 GB machine
    "cpu-gemma3-4k": HeadSettings(models=("gemma3-270m",), seqs=(4096,), penalty_seqs=(4096,), timed_seqs=(4096,),
                                  eval_seq=4096, repeats=1, warmup=0, full_path=False),
    # the word_unscrambling study's own batch, 16 rows of 64 tokens: 1,024 positions, two head chunks
    "cpu-gemma3-batch": HeadSettings(models=("gemma3-270m",), seqs=(64,), penalty_seqs=(64,), timed_seqs=(64,),
                                     eval_seq=None, repeats=3, warmup=1, full_path=False, batch=16),
    "smoke": HeadSettings(models=("tiny-random-llama",), seqs=(32, 64), penalty_seqs=(64,), timed_seqs=(64,),
                          eval_seq=64, repeats=1, warmup=0),
}


def build(name: str, h: HeadSettings, s: Settings):
    """(PEFT model, tokenizer): a named model, or the random 1B Llama with the embedded default's tokenizer."""
    with contextlib.redirect_stderr(io.StringIO()):
        if name == "llama-1b":
            _, tokenizer = load_model(ModelSection(name="smollm2-135m-instruct", dtype=h.dtype))
            torch.manual_seed(0)
            config = LlamaConfig(**{**LLAMA_1B, **({"num_hidden_layers": h.layers} if h.layers else {})})
            model = LlamaForCausalLM(config).to(getattr(torch, h.dtype))
        else:
            model, tokenizer = load_model(ModelSection(name=name, dtype=h.dtype))
        model = apply_lora(model, LoraSection(r=s.lora_r, alpha=2.0 * s.lora_r), dropout=0.0).to(DEVICE)
    if h.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def trainers(model, tokenizer, s: Settings, tmp: str, which: tuple[str, ...]) -> dict:
    """name -> trainer: hf (plain Trainer + PEFT), fused / full (ours, no penalty), kl / kl_full
    (exact KL-to-base, fused / today's full-logits path), ewc (K-FAC diagonal, fused)."""
    out = {}
    for name in which:
        penalties = {"kl": [KLToBase(KLConfig(weight=0.1))], "kl_full": [KLToBase(KLConfig(weight=0.1))],
                     "ewc": [EWC(EWCConfig(weight=100.0), fisher=random_fisher(model, "kfac_diag"))]}.get(name, [])
        cls = Trainer if name == "hf" else RegularizedTrainer
        trainer = make_trainer(cls, model, tokenizer, s, tmp, penalties)
        if name in ("full", "kl_full"):
            trainer.loss_head = "full"
        out[name] = trainer
    return out


def step_rows(label: str, model, tokenizer, s: Settings, h: HeadSettings, seq: int, which: tuple[str, ...],
              pairs: list[tuple[str, str, str | None, str | None]]) -> list[dict]:
    """One batch of h.batch x seq tokens; the peak memory of one step of each trainer, then timed rounds
    when seq is in timed_seqs; pairs: (ours, baseline, memory target, time target), those whose
    trainers ran. Each row is also printed to stderr as it is measured."""
    s = Settings(**{**s.__dict__, "batch_size": h.batch, "seq_len": seq})
    batch = training_batch(tokenizer, s)
    n_items = (batch["labels"][:, 1:] != -100).sum()
    timed = seq in h.timed_seqs and h.repeats > 0
    with tempfile.TemporaryDirectory() as tmp:
        ts = trainers(model, tokenizer, s, tmp, which)
        steps = {name: (lambda t=t: train_step(t, batch, n_items)) for name, t in ts.items()}
        peaks = {}
        for name, step in steps.items():
            print(f"  {label} T={seq}: peak memory of one {name} step ...", file=sys.stderr, flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                peaks[name] = peak_memory(step)
            print(f"    {peaks[name] / MB:.1f} MB", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            times = interleaved(steps, h.repeats, h.warmup) if timed else None
    out = []
    for ours, base, mem_target, time_target in pairs:
        if ours not in steps or base not in steps:
            continue
        common = {"unit": "MB", "model": label, "seq_len": seq, "batch": h.batch, "checkpointing": h.checkpointing,
                  "a": round(peaks[base] / MB, 1), "b": round(peaks[ours] / MB, 1)}
        out.append(row(f"head_peak_{ours}_vs_{base}_{label}_T{seq}", f"step peak memory, {ours} vs {base}",
                       peaks[ours] / peaks[base], mem_target, **common))
        if times is not None:
            a, b = walls(times[base]), walls(times[ours])
            out.append(row(f"head_time_{ours}_vs_{base}_{label}_T{seq}", f"step time, {ours} vs {base}",
                           paired_ratio(times[base], times[ours]), time_target,
                           cpu_ratio=paired_ratio(times[base], times[ours], cpu=True), unit="s/step",
                           a=round(median(a), 3), b=round(median(b), 3), model=label, seq_len=seq))
    for r in out:
        print("  " + json.dumps(r), file=sys.stderr, flush=True)
    return out


def eval_rows(label: str, model, tokenizer, seq: int) -> list[dict]:
    """The general-text eval's tuned side on one seq-token chunk: ours (the scored positions through
    the head, a chunk at a time) vs the model's whole logits and their log-softmax."""
    chunk = [{"input_ids": ids, "labels": ids} for ids in
             [training_batch(tokenizer, Settings(batch_size=1, seq_len=seq))["input_ids"][0].tolist()]]
    base = general.base_side(model, chunk, 256, 1, tokenizer.pad_token_id, BaseCache("bench", enabled=False), ())

    def ours():
        general.tuned_side(model, chunk, base, 1, tokenizer.pad_token_id)

    @torch.no_grad()
    def whole_logits():
        ids = torch.tensor([chunk[0]["input_ids"]], device=DEVICE)
        torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)

    model.eval()
    a, b = peak_memory(whole_logits), peak_memory(ours)
    model.train()
    return [row(f"head_eval_peak_{label}_T{seq}", "general-text eval peak memory, ours vs whole logits",
                b / a, None, unit="MB", a=round(a / MB, 1), b=round(b / MB, 1), model=label, seq_len=seq)]


CHUNKS = (128, 256, 512, 1024)


def chunk_rows(s: Settings, seq: int = 4096) -> list[dict]:
    """The chunk-size knob: the fused head alone (task loss, forward and backward) on [1, seq, 2048]
    hidden states through LLAMA_1B's 128k head: peak memory and CPU time per chunk size, against
    the largest."""
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(2048, LLAMA_1B["vocab_size"], bias=False).requires_grad_(False)  # frozen, as under LoRA
    head = Head(linear.to(DEVICE, getattr(torch, DTYPE)))
    hidden = torch.randn(1, seq, 2048, generator=gen).to(DEVICE, getattr(torch, DTYPE)).requires_grad_()
    labels = torch.randint(0, LLAMA_1B["vocab_size"], (1, seq), generator=gen).to(DEVICE)
    mask = next_token_mask(labels)
    measured = {}
    for chunk in CHUNKS:
        def call(chunk=chunk):
            loss, _ = chunked_loss(hidden, head, mask, [task_term(labels)], [1.0 / seq], chunk)
            loss.backward()
        start = clock()
        peak = peak_memory(call)
        measured[chunk] = (peak, since(start)[1])
        print(f"  chunk {chunk}: {peak / MB:.0f} MB, {measured[chunk][1]:.1f} s CPU", file=sys.stderr, flush=True)
    top = measured[max(CHUNKS)]
    return [row(f"head_chunk_{c}", f"fused head alone, T={seq}, chunk {c} vs {max(CHUNKS)}", m[1] / top[1], None,
                unit="MB", a=round(top[0] / MB, 1), b=round(m[0] / MB, 1), cpu_seconds=round(m[1], 1))
            for c, m in measured.items()]


def bench_head(s: Settings, preset: str) -> list[dict]:
    if preset == "chunks":
        return chunk_rows(s)
    h = HEAD_PRESETS[preset]
    rows = []
    for i, name in enumerate(h.models):
        label = name.split("-")[0] if name != "llama-1b" else f"llama-1b-{h.layers}l" if h.layers else name
        label += "-bf16" if h.dtype == "bfloat16" and DEVICE.type == "cpu" else ""
        model, tokenizer = build(name, h, s)
        last = i == len(h.models) - 1
        for seq in h.seqs:
            which = ("hf", "fused") + (("kl", "ewc") if last and seq in h.penalty_seqs else ())
            which += ("full", "kl_full") if h.full_path and "kl" in which and seq in h.timed_seqs else ()
            longest = seq == max(h.seqs)
            pairs = [("fused", "hf", "<= 0.5" if longest else None, "<= 1.0"),
                     ("kl", "hf", "<= 0.6" if longest else None, None), ("ewc", "hf", None, None),
                     ("kl", "fused", None, "<= 1.45"), ("kl_full", "full", None, "<= 1.45"),
                     ("full", "hf", None, None), ("kl_full", "hf", None, None)]
            rows += step_rows(label, model, tokenizer, s, h, seq, which, pairs)
        if h.eval_seq:
            rows += eval_rows(label, model, tokenizer, h.eval_seq)
        for r in rows:
            if r.get("model") == label and r["unit"] == "MB" and "seq_len" in r:
                # one [B x T, V] fp32 tensor: the full head holds several (logits, log-softmax, gradient)
                positions = r.get("batch", 1) * r["seq_len"]
                r["full_tensor_mb"] = round(positions * model.get_base_model().config.vocab_size * 4 / MB, 1)
        del model
    return rows
