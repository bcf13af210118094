"""The benchmark cases of scripts/bench.py, each a list of rows (`bench_measure.row`):

1. training step time and peak memory, each regularizer against its plain alternative;
2. the KL term's peak memory, chunked against naive, and its growth with the sequence;
3. eval throughput, our scorer against lm-evaluation-harness, with identical scores.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from transformers import Trainer, TrainingArguments

from bench_measure import (
    DEVICE, DTYPE, MB, Settings, clock, interleaved, median, paired_ratio, peak_memory, row, since, timed, walls
)
from workbench.data.bigbench import bigbench_mc
from workbench.data.examples import EXAMPLE_INDEX, Collator, general_text_examples
from workbench.evals.lmeval import run_lm_eval
from workbench.evals.tasks import local_task
from workbench.modeling.lora import as_base, lora_factors
from workbench.scoring.masks import IGNORE
from workbench.scoring.scorer import Request, Scorer, choice_outcome
from workbench.scoring.tokens import token_logprobs
from workbench.scoring.topk_kl import kl_bounds
from workbench.training.reference import TopKReference, build_topk_reference
from workbench.training.regularizers import EWC, DeltaL2, EWCConfig, KLConfig, KLToBase, PenaltyConfig
from workbench.training.engine import chunked_loss
from workbench.training.terms import kl_term
from workbench.training.trainer import RegularizedTrainer


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


def bf16_step(trainer: Trainer, batch: dict, n_items: torch.Tensor) -> None:
    """`train_step` under bf16 autocast over the fp32 weights: train.bf16 (accelerate wraps the
    model's forward in this autocast once `train()` prepares it; here nothing prepares it). On a
    GPU every row already runs in bf16, so there this row compares bf16 with bf16."""
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        train_step(trainer, batch, n_items)


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
        "bf16_mixed": (RegularizedTrainer, [], {}),  # its step runs under autocast, below
        "kl_topk_cache": (RegularizedTrainer, [KLToBase(KLConfig(weight=0.1, reference="topk_cache",
                                                                 top_k=s.top_k), reference_cache=reference)], {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_trainer(cls, model, tokenizer, s, tmp, penalties, **args)
                    for name, (cls, penalties, args) in configs.items()}
        steps = {name: (lambda t=t, b=indexed if name == "kl_topk_cache" else batch: train_step(t, b, n_items))
                 for name, t in trainers.items()}
        steps["bf16_mixed"] = lambda: bf16_step(trainers["bf16_mixed"], batch, n_items)
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
        pair("bf16_mixed", "no_regularizer", None),
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
        with as_base(model) as peft_model:
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
    base's final hidden states [1, seq, H], as the loss engine gets them with `train.loss_head: full`."""
    dtype = head.weight.dtype
    logits = torch.randn(1, seq, head.out_features, device=DEVICE, dtype=dtype, requires_grad=True)
    ref_hidden = torch.randn(1, seq, head.in_features, device=DEVICE, dtype=dtype)
    mask = torch.ones(1, seq, dtype=torch.bool, device=DEVICE)
    mask[:, -1] = False  # the last position predicts nothing, as in training

    def ours():
        loss, _ = chunked_loss(logits, None, mask, [kl_term(ref_hidden, head)], [1.0 / mask.sum()], chunk_size)
        loss.backward()

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

