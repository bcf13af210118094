"""The study's grid: two models x three kinds of fine-tune, each cell one `workbench compare`.

A cell is `<model>-<task>` (smollm2-unscramble, gemma3-gsm8k, ...): the cell's baseline recipe, its
eval suite and forgetting metrics, and its rows. A row is a run: a name, a recipe and the overrides
that make it, and the family `workbench compare` pools it into. Every row is the cell's baseline
plus one change, given as overrides, so a cell needs one baseline recipe and no copies. The
reference family, `baseline`, is training less: five seeds at full strength, each with its adapter
scales and its step-20 checkpoint. Against it each cell tests two published findings (a lower
learning rate, full fine-tuning), the first study's regularizers at one strength each, and the
newer methods. The strengths (docs/study.md, "The grid"):
  kl_to_base 1       the weight run with two seeds; 0.1 gave the same verdicts
  ewc 10,000         the lambda run with two seeds; the closest to helping on multiple choice
  delta_l2 0.001     0.01 learned too little for a multiple-choice comparison
  lora_dropout 0.1   neither strength differed; 0.1 is the recipe's and PEFT's usual value
  label_smoothing 0.1  the usual value; 0.3 was worse on everything, a verdict not worth repeating
  replay 0.2         the share base_replay (0.25 of a batch) is built to be compared with
Estimates (seconds on 2 CPU cores) are the table at the end: `estimate(cell, rows)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMOLLM2, GEMMA3 = "smollm2-135m-instruct", "gemma3-270m"
SEEDS = 5
FORGETTING_MC = ("retention.general.ppl.ratio", "retention.general.kl", "retention.mc.all.acc.delta")
FORGETTING_TEXT = ("retention.general.ppl.ratio", "retention.general.kl")
LIGHT_POINTS_PER_RUN = 4  # adapter scales 0.25, 0.5, 0.75 and the step-20 checkpoint


@dataclass(frozen=True)
class Row:
    name: str
    recipe: str            # under recipes/
    overrides: tuple[str, ...]
    family: str
    pending: str = ""      # why the grid cannot score this row yet ('' if it can)
    heavy: str = ""        # why the grid leaves this row out unless HEAVY=1 ('' if it runs)


@dataclass(frozen=True)
class Cell:
    name: str
    model: str
    task: str              # unscramble, gsm8k, nq_open
    baseline: str          # under recipes/
    suite: str
    forgetting: tuple[str, ...]
    general: str           # the cell's general text for replay and the Fisher: the suite's, not held out
    train_args: tuple[str, ...] = ()  # overrides on every row: the cell's trim to the grid's budget
    rows: list[Row] = field(default_factory=list)


def regularizer_rows(task: str, general: str) -> list[tuple[str, str]]:
    """(name, overrides) of every family a cell tests against its baseline."""
    distill_tokens = 160 if task == "gsm8k" else 40  # a rewrite of a worked solution, or of an answer
    return [
        ("lr_low", "train.learning_rate=0.0005"),
        ("full_ft", "lora.enabled=false train.learning_rate=0.00002"),
        ("kl_to_base", "regularizers.kl_to_base.weight=1.0"),
        ("ewc", "regularizers.ewc.weight=10000.0 regularizers.ewc.estimator=kfac_diag "
                f"regularizers.ewc.reference={general} regularizers.ewc.num_examples=32 regularizers.ewc.max_length=128"),
        ("delta_l2", "regularizers.delta_l2.weight=0.001"),
        ("lora_dropout", "regularizers.lora_dropout=0.1"),
        ("label_smoothing", "regularizers.label_smoothing=0.1"),
        ("replay", f"data.replay.source={general} data.replay.ratio=0.2"),
        ("base_replay", "regularizers.base_replay.ratio=0.25 regularizers.base_replay.num_samples=64 "
                        "regularizers.base_replay.max_new_tokens=63"),
        ("self_distill", f"data.self_distill.max_new_tokens={distill_tokens} data.self_distill.temperature=0.0 "
                         "data.self_distill.check_answer=true data.self_distill.rejected=original"),
        ("flow", "train.example_weights=flow"),
        ("osf", "lora.method=osf"),
    ]


# Rows the grid cannot score yet, or that measure nothing on 2 CPU cores, with why (docs/study.md).
FULL_FT = "workbench eval scores LoRA adapters only; a full fine-tune saves the whole model"
GEMMA3_REWRITES = ("Gemma 3's base ends none of its rewrites (docs/regularizers.md): every example falls back "
                   "to its reference, so the row would be the baseline")
GSM8K_REWRITES = "rewriting 160 worked solutions of up to 160 tokens takes about 90 min on 2 CPU cores (HEAVY=1 runs it)"


def pending(model: str, task: str, name: str) -> str:
    if name == "full_ft":
        return FULL_FT
    if name == "self_distill" and model == GEMMA3:
        return GEMMA3_REWRITES
    return ""


def heavy(task: str, name: str) -> str:
    return GSM8K_REWRITES if name == "self_distill" and task == "gsm8k" else ""


# Keys of methods about to land: a version without one leaves its row out (any other unknown key is an error).
LANDING = ("train.example_weights", "lora.method")


def cell(model: str, task: str, baseline: str, suite: str, forgetting: tuple[str, ...],
         train_args: tuple[str, ...] = ()) -> Cell:
    short = "smollm2" if model == SMOLLM2 else "gemma3"
    general = "builtin:pydoc" if task == "unscramble" else "builtin:factbook"
    rows = [Row("baseline", baseline, (), "baseline")]
    rows += [Row(f"baseline_s{seed}", baseline, (f"train.seed={seed}",), "baseline") for seed in range(1, SEEDS)]
    rows += [Row(name, baseline, tuple(overrides.split()), name, pending(model, task, name), heavy(task, name))
             for name, overrides in regularizer_rows(task, general)]
    return Cell(f"{short}-{task}", model, task, baseline, suite, forgetting, general, train_args, rows)


# The trims that fit the grid in about 8 hours on 2 cores (docs/study.md, "The grid"): one epoch
# each, of 320 examples for SmolLM2 on the short tasks (the first study's 40 steps of 16 stopped half
# way, with its checkpoint there), 128 for SmolLM2 on GSM8K (max_length 256 keeps 93% of the
# solutions whole) and Gemma on the short tasks, 32 for Gemma on GSM8K; no checkpoint but the last
# outside the first cell (the adapter scales draw each front).
SMOLLM2_SHORT = ("train.max_steps=20", "data.max_examples=320", "train.eval_steps=20", "train.save_steps=10")
SMOLLM2_NQ_OPEN = ("train.max_steps=20", "data.max_examples=320", "train.eval_steps=20", "train.save_steps=20")
SMOLLM2_GSM8K = ("train.max_steps=16", "train.batch_size=8", "data.max_examples=128", "data.max_length=256",
                 "data.max_val_examples=32", "train.eval_steps=16", "train.save_steps=16")
GEMMA3_SHORT = ("train.max_steps=16", "train.batch_size=8", "data.max_examples=128", "data.max_val_examples=32",
                "train.eval_steps=16", "train.save_steps=16")
GEMMA3_GSM8K = ("train.max_steps=8", "train.batch_size=4", "data.max_examples=32", "data.max_length=256",
                "data.max_val_examples=16", "train.eval_steps=8", "train.save_steps=8")

CELLS = [
    cell(SMOLLM2, "unscramble", "smollm2/baseline.yaml", "evals/smollm2.yaml", FORGETTING_MC, SMOLLM2_SHORT),
    cell(SMOLLM2, "nq_open", "smollm2/nq_open_baseline.yaml", "evals/smollm2_nq_open.yaml", FORGETTING_MC,
         SMOLLM2_NQ_OPEN),
    cell(SMOLLM2, "gsm8k", "smollm2/gsm8k_baseline.yaml", "evals/smollm2_gsm8k_grid.yaml", FORGETTING_MC,
         SMOLLM2_GSM8K),
    cell(GEMMA3, "unscramble", "gemma3/baseline.yaml", "evals/gemma3.yaml", FORGETTING_TEXT, GEMMA3_SHORT),
    cell(GEMMA3, "nq_open", "gemma3/nq_open_baseline.yaml", "evals/gemma3_nq_open.yaml", FORGETTING_TEXT,
         GEMMA3_SHORT),
    cell(GEMMA3, "gsm8k", "gemma3/gsm8k_baseline.yaml", "evals/gemma3_gsm8k_grid.yaml", FORGETTING_MC, GEMMA3_GSM8K),
]


# --- what a row may need that this version lacks ---------------------------------------------------


def missing_key(row: Row) -> str:
    """The first override key of `row` that this version's recipe schema has no field for ('' if none):
    a method that has not landed yet, which the grid leaves out rather than fail on."""
    from workbench.config.recipe import Recipe

    for override in row.overrides:
        key = override.partition("=")[0]
        model = Recipe
        for part in key.split("."):
            if model is None:
                break
            if part not in model.model_fields:
                return key
            model = _section(model.model_fields[part].annotation)
    return ""


def _section(annotation):
    """The pydantic model inside a field's annotation (`X`, `X | None`), else None."""
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_section, get_args(annotation)) if m is not None), None)


# --- the estimate ----------------------------------------------------------------------------------
# Seconds on 2 CPU cores, fp32, LoRA r 16 on all linear layers (docs/study.md, "The grid", says where
# each figure comes from). A step is 16 rows at the task's length; a larger or smaller batch scales it.
STEP_S = {(SMOLLM2, "unscramble"): 2.9, (SMOLLM2, "nq_open"): 2.9, (SMOLLM2, "gsm8k"): 23.0,
          (GEMMA3, "unscramble"): 16.0, (GEMMA3, "nq_open"): 16.0, (GEMMA3, "gsm8k"): 130.0}
LOAD_S = {SMOLLM2: 20.0, GEMMA3: 40.0}             # loading the model, the data and the optimizer, per run
STEP_FACTOR = {"kl_to_base": 1.6, "ewc": 1.02, "delta_l2": 1.02, "label_smoothing": 1.03,
               "flow": 1.1, "osf": 1.2}             # benchmarks.md; flow: its base-loss pass, osf: its SVDs
VAL_FACTOR = 0.5                                    # a validation batch against a training step
# One final adapter's whole suite (generation included), and one light point (learning, general text).
EVAL_S = {(SMOLLM2, "unscramble"): (70.0, 10.0), (SMOLLM2, "nq_open"): (80.0, 10.0),
          (SMOLLM2, "gsm8k"): (200.0, 40.0), (GEMMA3, "unscramble"): (220.0, 40.0),
          (GEMMA3, "nq_open"): (220.0, 40.0), (GEMMA3, "gsm8k"): (320.0, 90.0)}
DECODE_S = {SMOLLM2: 3.3, GEMMA3: 3.5}             # one decoding step of 16 rows


@dataclass(frozen=True)
class Estimate:
    train: float = 0.0       # training steps, validation and loading
    generation: float = 0.0  # base_replay's pool and self_distill's rewrites, each generated once
    eval: float = 0.0        # the cell's one `workbench eval`: every final adapter and light point

    @property
    def total(self) -> float:
        return self.train + self.generation + self.eval

    def describe(self) -> str:
        return ", ".join(f"{name} {round(seconds / 60)} min" for name, seconds in
                         (("train", self.train), ("generation", self.generation), ("eval", self.eval)))


def estimate(cell: Cell, rows: list[Row], todo: list[Row], profile: tuple[str, ...] = (),
             pools: set[str] | None = None) -> Estimate:
    """Seconds for `cell`: training the rows in `todo`, generating what they need, scoring every row.
    `pools` holds the models whose base_replay pool an earlier cell generates (shared by base and
    settings); this cell adds its model when it generates one."""
    from workbench.config.recipe import load_recipe

    pools = set() if pools is None else pools
    key, train, generation, lights = (cell.model, cell.task), 0.0, 0.0, 0
    for row in rows:
        recipe = load_recipe(RECIPES / row.recipe, [*cell.train_args, *profile, *row.overrides])
        t, d = recipe.train, recipe.data
        lights += 3 + max(0, (t.max_steps - 1) // t.save_steps if t.save_steps else 0)
        if row not in todo:
            continue
        step = STEP_S[key] * t.batch_size / 16 * STEP_FACTOR.get(row.family, 1.0)
        passes = -(-t.max_steps // t.eval_steps) if t.eval_steps else 1
        train += LOAD_S[cell.model] + t.max_steps * step + passes * -(-d.max_val_examples // 16) * VAL_FACTOR * step
        chunks = -(-min(d.max_examples or t.max_steps * t.batch_size, t.max_steps * t.batch_size) // 16)
        if d.self_distill is not None:
            generation += chunks * d.self_distill.max_new_tokens * DECODE_S[cell.model]
        replay = recipe.regularizers.base_replay
        if replay is not None and cell.model not in pools:
            pools.add(cell.model)
            generation += -(-replay.num_samples // 16) * replay.max_new_tokens * DECODE_S[cell.model]
    final, light = EVAL_S[key]
    return Estimate(train, generation, len(rows) * final + lights * light)
