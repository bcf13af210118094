"""`train.select`: the run's adapter is the best checkpoint within a budget, not the last one.

Under `train.select` every checkpoint is kept, and the retention probe and the evaluation run at
each one (`probe.RetentionProbeCallback`), so each checkpoint's step has its values in the
history. After training, the checkpoints whose values meet every bound in `subject_to` are the
candidates; the one with the lowest `metric` (the earliest on a tie) is copied to `adapter/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from workbench.config.recipe import Select

# what a checkpoint holds of the adapter and its tokenizer; not the optimiser, scheduler or RNG state
ADAPTER_PARTS = ("adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def values_at(history: list[dict], step: int, keys: list[str]) -> dict[str, float]:
    """The last value logged at `step` of each key that was logged there."""
    found: dict[str, float] = {}
    for record in history:
        if record.get("step") == step:
            found.update({k: float(record[k]) for k in keys if k in record})
    return found


def choose(history: list[dict], steps: list[int], select: Select) -> dict:
    """The selection, as run.json records it: metric, subject_to, every candidate step with its
    values and the bounds it breaks, and the chosen `step` (None when no checkpoint meets them)."""
    keys = [select.metric, *[k for k in select.subject_to if k != select.metric]]
    candidates = []
    for step in sorted(steps):
        values = values_at(history, step, keys)
        missing = [k for k in keys if k not in values]
        broken = [k for k, bound in select.subject_to.items() if k in values and values[k] > bound]
        candidates.append({"step": step, **values, "meets": not missing and not broken,
                           "breaks": broken, **({"missing": missing} if missing else {})})
    meeting = [c for c in candidates if c["meets"]]
    best = min(meeting, key=lambda c: (c[select.metric], c["step"])) if meeting else None
    bounds = ", ".join(f"{k} <= {v:g}" for k, v in select.subject_to.items()) or "no bounds"
    if best is not None:
        reason = (f"lowest {select.metric} ({best[select.metric]:.4g}) of the {len(meeting)} of "
                  f"{len(candidates)} checkpoints with {bounds}")
    else:
        reason = f"none of the {len(candidates)} checkpoints has {bounds}"
    return {"metric": select.metric, "subject_to": dict(select.subject_to),
            "step": best["step"] if best else None, "reason": reason, "candidates": candidates}


def closest(selection: dict) -> str:
    """For the failure message: each bound's best value over the checkpoints, and where."""
    parts = []
    for key, bound in selection["subject_to"].items():
        measured = [c for c in selection["candidates"] if key in c]
        if measured:
            c = min(measured, key=lambda c: c[key])
            parts.append(f"the lowest {key} was {c[key]:.4g} at step {c['step']} (bound {bound:g})")
    return "; ".join(parts)


def copy_adapter(checkpoint: Path, adapter_dir: Path) -> None:
    """The checkpoint's adapter and tokenizer files as `adapter_dir`: copied into a temporary
    directory first, so a kill leaves the previous adapter directory or the new one, never a mix."""
    tmp = adapter_dir.with_name(f".{adapter_dir.name}.tmp")
    old = adapter_dir.with_name(f".{adapter_dir.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ADAPTER_PARTS:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, tmp / name)
    if adapter_dir.exists():
        adapter_dir.rename(old)
    tmp.rename(adapter_dir)
    shutil.rmtree(old, ignore_errors=True)
