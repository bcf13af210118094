"""`workbench average`: a run's final adapter averaged in weight space with its earlier checkpoints.

Averaging with an earlier checkpoint is one of the free ways to forget less (it pulls the delta
back along the training path), so it belongs in any comparison at matched learning. The average
is of the weight deltas, sum_i w_i * s_i * B_i @ A_i, not of the factors (B and A averaged apart
would give a different, lower-rank product). PEFT's `add_weighted_adapter(combination_type="cat")`
writes exactly that sum as one LoRA adapter whose rank is the sum of the ranks, so nothing is
approximated. The output is a run directory: `adapter/` and a `run.json` copied from the source
run (same base, data and split, so `workbench eval --run` scores learning as well as forgetting),
with the recipe named `<name>_avg` and `averaged_from` saying which adapters and weights.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from workbench.config.recipe import Recipe
from workbench.errors import UsageError
from workbench.formats.integrity import write_manifest
from workbench.formats.run_record import read_run
from workbench.io import writing

FINAL = "final"


def adapter_dirs(run_dir: Path, steps: list[str]) -> list[Path]:
    """The adapter directory of each step: `final` is the run's adapter, N its checkpoint-N."""
    record = read_run(run_dir)
    out = []
    for step in steps:
        if step == FINAL:
            path = run_dir / (record.adapter or "adapter")
        elif step.isdigit():
            path = run_dir / "checkpoints" / f"checkpoint-{int(step)}"
        else:
            raise UsageError(f"--steps {step}: expected a checkpoint step or '{FINAL}'")
        if not (path / "adapter_model.safetensors").is_file():
            saved = sorted(int(p.name.rpartition("-")[2]) for p in (run_dir / "checkpoints").glob("checkpoint-*")
                           if p.name.rpartition("-")[2].isdigit())
            raise UsageError(f"{path}: no adapter there (checkpoints saved at steps: "
                             f"{', '.join(map(str, saved)) or 'none'}; see train.save_steps)")
        out.append(path)
    return out


def check_weights(weights: list[float] | None, n: int) -> list[float]:
    """Equal weights by default; else n positive weights that sum to 1 (an average, not a sum)."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise UsageError(f"--weights: {len(weights)} weights for {n} adapters")
    if any(w <= 0 for w in weights) or not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise UsageError(f"--weights {' '.join(f'{w:g}' for w in weights)}: expected positive weights "
                         "that sum to 1")
    return list(weights)


def average_run(run_dir: str | Path, steps: list[str], out: str | Path, weights: list[float] | None = None) -> Path:
    """Write `out/adapter` (the weighted average of the named adapters' deltas) and `out/run.json`;
    returns `out`. The directory appears complete or not at all."""
    from peft import PeftModel

    from workbench.modeling.load import load_model, load_tokenizer

    run_dir, out = Path(run_dir), Path(out)
    if len(steps) < 2:
        raise UsageError("--steps: name at least two adapters to average (e.g. 'final 20')")
    if out.exists():
        raise UsageError(f"{out}: already exists; averaging writes a new run directory")
    paths = adapter_dirs(run_dir, steps)
    weights = check_weights(weights, len(paths))
    record = read_run(run_dir)
    recipe = Recipe.model_validate(record.recipe)
    tokenizer = load_tokenizer(recipe.model)
    model, tokenizer = load_model(recipe.model, tokenizer)
    peft_model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="s0")
    for i, path in enumerate(paths[1:], start=1):
        peft_model.load_adapter(str(path), adapter_name=f"s{i}")
    names = [f"s{i}" for i in range(len(paths))]
    with torch.no_grad():
        peft_model.add_weighted_adapter(names, weights, "average", combination_type="cat")
    peft_model.set_adapter("average")
    for name in names:
        peft_model.delete_adapter(name)
    averaged = [{"adapter": str(p), "step": s, "weight": w} for p, s, w in zip(paths, steps, weights)]
    return write_derived_run(out, peft_model, "average", tokenizer, record, f"{recipe.name}_avg",
                             {"averaged_from": averaged, "source_run": str(run_dir)})


def write_derived_run(out: Path, peft_model, adapter: str, tokenizer, record, name: str, extra: dict) -> Path:
    """A run directory made from another run's adapter (averaged, intruders reduced): `adapter/`, a
    standard PEFT adapter sealed with a manifest, and the source's run.json (same base, data and
    split, so `workbench eval --run` scores learning too) under the recipe name `name`, a family
    of its own, with `extra` keys saying where it came from. Staged, then renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(out, "nothing was written"), \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / "run"
        peft_model.save_pretrained(str(staged / "adapter"), selected_adapters=[adapter])
        _flatten(staged / "adapter", adapter)
        tokenizer.save_pretrained(str(staged / "adapter"))
        write_manifest(staged / "adapter")
        record.recipe = {**record.recipe, "name": name, "family": None}
        record.adapter, record.status, record.history = "adapter", "completed", None
        for key, value in extra.items():
            setattr(record, key, value)
        record.write(staged)
        staged.rename(out)
    return out


def _flatten(adapter_dir: Path, name: str) -> None:
    """save_pretrained puts a non-default adapter in a subfolder named after it: move it up, so
    `adapter/` is a standard PEFT adapter directory."""
    nested = adapter_dir / name
    if nested.is_dir():
        for item in nested.iterdir():
            shutil.move(str(item), adapter_dir / item.name)
        nested.rmdir()
