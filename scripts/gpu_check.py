#!/usr/bin/env python
"""The Python parts of scripts/gpu_check.sh, one command each:

    python scripts/gpu_check.py throughput --json b.json [--smoke] [--peak-tflops X]
    python scripts/gpu_check.py adapter RUN_DIR [--fsdp]
    python scripts/gpu_check.py evals --json d.json [--smoke]

throughput (part b): training tokens/s and MFU of one step on the embedded default
(SmolLM2-135M-Instruct) and a randomly initialised Llama of about 1B parameters built from a
LlamaConfig (128k vocabulary, hidden 2048, 16 layers, MLP 8192, 32 heads and 8 KV heads, tied
embeddings as Llama 3.2 1B; nothing is downloaded). Each with LoRA r 16 on every linear layer,
under three trainers on the same batch: a plain HF `Trainer` on the PEFT model, our
`RegularizedTrainer` with no penalty, and with the exact KL-to-base (weight 0.1). Steps are timed
in rounds of random order after untimed warm-up rounds (bench_measure.interleaved); a figure is
the median over rounds. bf16 on a GPU, fp32 on CPU.

MFU = 6 * N * tokens/s / peak bf16 FLOP/s, N the weights that multiply every token: all the base
model's parameters less the input embedding (a lookup; with tied embeddings it is also the LM
head, which does multiply, so nothing is taken off). With LoRA the frozen weights get no weight
gradient, so a step does about 4N FLOPs per token, not 6N: the 6N MFU is the usual yardstick
against full fine-tuning, and 4/6 of it is the share of work actually done. Peak: H100 SXM and
H200 989 TFLOP/s dense bf16, H100 PCIe 756; another device gets no MFU unless --peak-tflops.

adapter (parts a and c): RUN_DIR/adapter loads in plain PEFT (`PeftModel.from_pretrained`) onto
the run's base model, holds the saved weights, is trained (some LoRA B nonzero) and changes the
logits; --fsdp: the run's checkpoints were saved through FSDP (the Trainer writes `optimizer.pt`
only without it; accelerate runs an FSDP config as plain DDP on CPU).

evals (part d): eval tokens/s of our scorer against lm-evaluation-harness on the embedded
default, multiple choice on the shipped local task and rolling perplexity on pydoc text
(bench_cases.bench_multiple_choice and bench_perplexity; the scores must be identical).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see scripts/bench.py
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the workbench package, run from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cases import bench_multiple_choice, bench_perplexity, make_trainer, train_step, training_batch  # noqa: E402
from bench_measure import DEVICE, DTYPE, PRESETS, interleaved, machine, median, peak_memory  # noqa: E402
from workbench.config.recipe import LoraSection, ModelSection  # noqa: E402
from workbench.errors import UsageError  # noqa: E402
from workbench.formats.run_record import read_run  # noqa: E402
from workbench.modeling.load import apply_lora, load_model  # noqa: E402
from workbench.training.regularizers import KLConfig, KLToBase  # noqa: E402
from workbench.training.trainer import RegularizedTrainer  # noqa: E402

PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}  # dense, no sparsity; first match wins
LLAMA_1B = dict(vocab_size=128_256, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
LLAMA_TOY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
LOCAL_TASK = str(Path(__file__).resolve().parents[1] / "evals/tasks/capitals.yaml")  # no download
SETTINGS = {"gpu": replace(PRESETS["full"], batch_size=8, seq_len=1024, repeats=5, warmup=2, mc_task=LOCAL_TASK,
                           ppl_docs=64, ppl_chars=4000, eval_batch_size=16),
            "smoke": replace(PRESETS["smoke"], batch_size=2, seq_len=32)}


def peak_flops(device_name: str | None, tflops: float | None = None) -> float | None:
    """The dense bf16 peak of the named CUDA device (or `tflops`), None where it is not in
    PEAK_BF16 or there is no CUDA device (device_name None)."""
    if tflops is not None:
        return tflops * 1e12
    return next((peak for key, peak in PEAK_BF16.items() if key in (device_name or "")), None)


def matmul_weights(model: torch.nn.Module) -> int:
    """N of the MFU: the base model's parameters less the input embedding, unless it is tied to the head."""
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total if embedding is head else total - embedding.numel()


def random_llama(shape: dict) -> torch.nn.Module:
    """A Llama of `shape` with random weights, built on the device in the benchmark's dtype."""
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.device(DEVICE):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, DTYPE))


def measure(name: str, model, tokenizer, s, peak: float | None) -> list[dict]:
    """One row per trainer: median step time, tokens/s, MFU and (on a GPU) the step's peak memory."""
    n = matmul_weights(model)
    model = apply_lora(model, LoraSection(r=s.lora_r, alpha=2.0 * s.lora_r), dropout=0.0).to(DEVICE)
    batch = training_batch(tokenizer, s)
    n_items = (batch["labels"][:, 1:] != -100).sum()
    tokens = int(batch["attention_mask"].sum())
    configs = {"hf_trainer_peft": (Trainer, []), "ours_no_penalty": (RegularizedTrainer, []),
               "ours_kl_to_base": (RegularizedTrainer, [KLToBase(KLConfig(weight=0.1))])}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {key: make_trainer(cls, model, tokenizer, s, tmp, penalties) for key, (cls, penalties) in configs.items()}
        steps = {key: (lambda t=t: train_step(t, batch, n_items)) for key, t in trainers.items()}
        with contextlib.redirect_stdout(io.StringIO()):
            times = interleaved(steps, s.repeats, s.warmup)
            peaks = {key: peak_memory(step) for key, step in steps.items()} if DEVICE.type == "cuda" else {}
    rows = []
    for key in configs:
        seconds = median([wall for wall, _ in times[key]])
        per_second = tokens / seconds
        rows.append({"model": name, "trainer": key, "matmul_weights": n, "tokens_per_step": tokens,
                     "step_s": round(seconds, 4), "tokens_per_s": round(per_second, 1),
                     "mfu": None if peak is None else float(f"{6 * n * per_second / peak:.4g}"),
                     "peak_mb": round(peaks[key] / 2**20, 1) if key in peaks else None})
    return rows


def throughput(args) -> list[dict]:
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else None
    s, peak = SETTINGS["smoke" if args.smoke else "gpu"], peak_flops(name, args.peak_tflops)
    print(f"throughput: {machine()}; batch {s.batch_size} x {s.seq_len} tokens, {s.repeats} timed rounds",
          file=sys.stderr)
    with contextlib.redirect_stderr(io.StringIO()):
        default, tokenizer = load_model(ModelSection(name=s.model, dtype=DTYPE))
    rows = measure(s.model, default.to(DEVICE), tokenizer, s, peak)
    del default
    # the batch's token ids come from the default's tokenizer; any id is below the 128k vocabulary
    rows += measure("llama-toy-random" if args.smoke else "llama-1b-random",
                    random_llama(LLAMA_TOY if args.smoke else LLAMA_1B), tokenizer, s, peak)
    print("| model | trainer | N | tokens/step | s/step | tokens/s | MFU (6N) | peak MB |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"| {r['model']} | {r['trainer']} | {r['matmul_weights'] / 1e6:.1f}M | {r['tokens_per_step']} | "
              f"{r['step_s']} | {r['tokens_per_s']:g} | {mfu} | {r['peak_mb'] or '-'} |")
    return rows


def evals(args) -> list[dict]:
    s = SETTINGS["smoke" if args.smoke else "gpu"]
    with contextlib.redirect_stderr(io.StringIO()):
        model, tokenizer = load_model(ModelSection(name=s.model, dtype=DTYPE))
    model = model.to(DEVICE).eval()
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_multiple_choice(model, tokenizer, s, Path(tmp)) + bench_perplexity(model, tokenizer, s, Path(tmp))
    for r in rows:
        print(f"{r['name']}: ours {r['b']:g} tokens/s, lm-eval {r['a']:g} tokens/s (x{r['ratio']:.2f}), "
              f"identical scores: {r['identical_scores']}")
    return rows


def adapter(args) -> list[dict]:
    """The checks of the adapter command (see the module docstring); an AssertionError names the failed one."""
    from peft import PeftModel
    from safetensors.torch import load_file

    run = read_run(args.run)
    section = ModelSection(**{**run.recipe["model"], "load_in_4bit": False})  # the plain weights it was tuned on
    with contextlib.redirect_stderr(io.StringIO()):
        base, _ = load_model(section)
    folder = args.run / "adapter"
    model = PeftModel.from_pretrained(base, str(folder))
    saved = load_file(folder / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(loaded) > 0, f"{len(saved)} tensors saved, {len(loaded)} LoRA tensors loaded"
    for key, value in saved.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(loaded[name].to(value.dtype), value), f"{key}: loaded != saved"
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k), "every LoRA B is zero: not trained"
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    change = float((tuned - plain).abs().max())
    assert change > 0, "the adapter does not change the logits"
    checkpoints = sorted(args.run.glob("checkpoints/checkpoint-*"))
    if args.fsdp:
        assert checkpoints, "no checkpoint to tell how it was saved"
        assert not any((c / "optimizer.pt").exists() for c in checkpoints), \
            "the checkpoints hold optimizer.pt: the Trainer ran without FSDP"
    print(f"adapter: {folder} loads in PEFT ({len(saved)} tensors as saved), max logit change {change:.3g}, "
          f"{run.global_step} steps, world size {run.world_size}"
          + (", checkpoints saved through FSDP" if args.fsdp else ""))
    return [{"run": str(args.run), "tensors": len(saved), "max_logit_change": change, "steps": run.global_step}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("throughput", throughput), ("evals", evals), ("adapter", adapter)):
        sub = commands.add_parser(name)
        sub.set_defaults(fn=fn)
        sub.add_argument("--json", type=Path, help="write the rows as a JSON list to this file")
        if name == "adapter":
            sub.add_argument("run", type=Path, help="a run directory")
            sub.add_argument("--fsdp", action="store_true", help="also check the run trained under FSDP")
        else:
            sub.add_argument("--smoke", action="store_true", help="toy sizes on CPU, seconds; for tests")
        if name == "throughput":
            sub.add_argument("--peak-tflops", type=float, help="the peak bf16 TFLOP/s for MFU (default: by device)")
    args = parser.parse_args(argv)
    try:
        rows = args.fn(args)
    except UsageError as exc:  # a missing or damaged run directory: one line, as the workbench says it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AssertionError as exc:  # a check that did not hold
        print(f"failed: {args.command}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps([{**r, "device": machine()} for r in rows], indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
