"""`workbench reduce-intruders`: a trained adapter with its intruder dimensions damped, by PEFT's
own `reduce_intruder_dimension`, written as a new run.

A LoRA fine-tune grows "intruder dimensions": singular vectors of the tuned weight W + dW nearly
orthogonal to every singular vector of the base W, which full fine-tuning does not grow and which
carry much of what LoRA forgets ("LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024).
PEFT looks among the `top_k` largest singular vectors of each merged layer for those whose best
|cosine| with the base's is under `epsilon`, keeps `mitigation` of them (0.75: a quarter of each
intruder direction is removed) and factors the new delta back into the adapter's rank. Damping
is post hoc, like scaling the adapter, so it belongs in a comparison at matched learning: the
output is a run directory that `workbench eval --run` scores as a family of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

from workbench.config.recipe import Recipe
from workbench.errors import UsageError
from workbench.formats.run_record import read_run
from workbench.training.average import write_derived_run

_INTRUDERS = re.compile(r"Intruders: (\d+)")


def reduce_run(run_dir: str | Path, out: str | Path, top_k: int = 10, epsilon: float = 0.5,
               mitigation: float = 0.75) -> tuple[Path, dict]:
    """Write `out` (the run with its adapter's intruder dimensions damped); returns (out, counts):
    layers, layers with intruders, intruder dimensions."""
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    from workbench.modeling.load import load_model, load_tokenizer

    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise UsageError(f"{out}: already exists; reduce-intruders writes a new run directory")
    if top_k < 1 or not 0.0 < epsilon <= 1.0 or not 0.0 <= mitigation <= 1.0:
        raise UsageError(f"--top-k {top_k} --epsilon {epsilon:g} --lambda {mitigation:g}: expected top-k >= 1, "
                         "epsilon in (0, 1] and lambda in [0, 1]")
    record = read_run(run_dir)
    recipe = Recipe.model_validate(record.recipe)
    adapter = run_dir / (record.adapter or "adapter")
    if not recipe.lora.enabled or not (adapter / "adapter_model.safetensors").is_file():
        raise UsageError(f"{run_dir}: no LoRA adapter to reduce (a full fine-tune, or a run that did not complete)")
    if recipe.model.load_in_4bit:  # PEFT reads the base weight as it is stored: packed 4-bit bytes
        raise UsageError(f"{run_dir}: reduce-intruders needs the base's weights unquantised; it was trained "
                         "with model.load_in_4bit (PEFT's function decomposes the stored base weight)")
    tokenizer = load_tokenizer(recipe.model)
    model, tokenizer = load_model(recipe.model, tokenizer)
    peft_model = PeftModel.from_pretrained(model, str(adapter), adapter_name="default")
    if any(getattr(c, "use_dora", False) for c in peft_model.peft_config.values()):
        raise UsageError(f"{adapter}: a DoRA adapter; PEFT reduces intruders of plain LoRA only (DoRA's weight "
                         "is renormalised per row, which the subtraction does not keep)")
    lines: list[str] = []
    reduce_intruder_dimension(peft_model, "default", "reduced", top_k=top_k, threshold_epsilon=epsilon,
                              mitigation_lambda=mitigation, logging_sink=lines.append)
    found = [int(m[1]) for line in lines if (m := _INTRUDERS.search(line))]  # "<layer>: Intruders: n"
    layers = len(found) + sum(line.endswith(": No intruders") for line in lines)
    counts = {"layers": layers, "layers_with_intruders": len(found), "intruder_dimensions": sum(found)}
    settings = {"top_k": top_k, "epsilon": epsilon, "lambda": mitigation}
    write_derived_run(out, peft_model, "reduced", tokenizer, record, f"{recipe.name}_intruders",
                      {"intruders_reduced": {**settings, **counts}, "source_run": str(run_dir)})
    return out, counts
