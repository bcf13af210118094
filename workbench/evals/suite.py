"""The eval suite: one validated YAML naming what `workbench eval` measures, base vs tuned.

    name: smollm2
    general: {source: builtin:pydoc_heldout, num_chunks: 32, chunk_length: 256, top_k: 256}
    multiple_choice:
      - bigbench: movie_recommendation
        limit: 80
      - local: tasks/my_task.yaml            # an lm-evaluation-harness task file
    target: {num_examples: 64}               # the run's held-out split, or explicit files
    overfitting: {num_examples: 64, min_k: 0.2}
    scales: [0.25, 0.5, 0.75]                # adapter-scale sweep (0 is the base, 1 the adapter)
    checkpoints: all                         # a run's saved checkpoints as entries too
    light_points: true                       # scale and checkpoint entries: learning and general text

Paths are relative to the suite file. Every section may be switched off with `null`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from workbench.errors import UsageError
from workbench.io import fingerprint
from workbench.config.recipe import GeneralText, Section, read_yaml, describe_error


class MultipleChoiceTask(Section):
    """A BIG-bench task by name, or a local lm-evaluation-harness task YAML; `limit` caps items."""

    bigbench: str | None = Field(default=None, description="A BIG-bench task's name (its multiple-choice items); "
                                 "give this or local.")
    local: str | None = Field(default=None, description="An lm-evaluation-harness task YAML, relative to the suite "
                              "file; give this or bigbench.")
    limit: int | None = Field(default=None, ge=1, description="Score only the first N items; default all.")
    prompt: Literal["qa", "chat"] = Field(
        default="qa", description="A BIG-bench item's format: qa is `Q: {input}\\nA:` with each choice after a "
        "space; chat is the input as a user turn in the model's chat template, each choice the start of the "
        "assistant's reply (a format a fine-tune on plain `Q:/A:` prompts does not train).")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.bigbench is None) == (self.local is None):
            raise ValueError("give exactly one of 'bigbench' or 'local'")
        if self.local is not None and self.prompt != "qa":
            raise ValueError("'prompt' applies to bigbench tasks; a local task's YAML sets its own doc_to_text")
        return self

    @property
    def name(self) -> str:
        return self.bigbench or Path(self.local).stem


class Target(Section):
    """Learning on the target task. With `--run`, the run's own split is used unless files are given."""

    train: str | None = Field(default=None, description="Training examples (members), when there is no run.")
    heldout: str | None = Field(default=None, description="Held-out examples, e.g. a test split.")
    format: Literal["auto", "messages", "prompt_completion"] = Field(
        default="auto", description="Record layout of the files, as a recipe's data.format.")
    max_length: int = Field(default=512, ge=8, description="Tokens per example of the files; longer ones are cut.")
    num_examples: int = Field(default=64, ge=2, description="Held-out examples scored for loss and exact match.")
    max_new_tokens: int = Field(default=64, ge=1, description="Generation cap for exact match.")


class Overfitting(Section):
    """Train vs held-out: loss gap, extraction, membership inference."""

    num_examples: int = Field(default=64, ge=2, description="Members and non-members, each.")
    min_k: float = Field(default=0.2, gt=0.0, le=1.0, description="Min-K% Prob's share: an example's score is "
                         "the mean of its lowest ceil(k * n) token log-probs.")


class LmEval(Section):
    """Named lm-evaluation-harness tasks run on base and tuned (needs the lmeval extra)."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task names, built in or found under "
                             "include_path, or task YAML files.")
    include_path: str | None = Field(default=None, description="A directory of task YAMLs, relative to the suite "
                                     "file; default lm-eval's built-in tasks.")
    limit: int | None = Field(default=None, ge=1, description="Items per task; default all.")


class Suite(Section):
    name: str = Field(description="The suite's name, recorded in results.json.")
    description: str = Field(default="", description="Free text.")
    batch_size: int = Field(default=8, ge=1, description="Sequences per forward pass, base and tuned.")
    max_length: int = Field(default=1024, ge=8, description="Scorer window in tokens.")
    bootstrap: int = Field(default=1000, ge=10, description="Paired bootstrap resamples for CIs.")
    ece_bins: int = Field(default=10, ge=1, description="Bins of the multiple-choice calibration error (ECE).")
    general: GeneralText | None = Field(default=GeneralText(), description="Retention on held-out general text: "
                                        "perplexity ratio, KL(base || tuned), top-1 agreement.")
    multiple_choice: list[MultipleChoiceTask] = Field(default=[], description="Retention on multiple-choice "
                                                      "tasks: accuracy and calibration, base vs tuned.")
    target: Target | None = Field(default=Target(), description="Learning on the target task: held-out loss and "
                                  "exact match of greedy generations.")
    overfitting: Overfitting | None = Field(default=Overfitting(), description="Train vs held-out: loss gap, "
                                            "extraction, membership inference.")
    scales: list[float] = Field(default=[], description="Extra adapter scales to evaluate, in [0, 1].")
    checkpoints: Literal["all"] | list[int] = Field(
        default=[], description="A run's saved checkpoints to score as entries NAME:stepN besides its final "
        "adapter: 'all', or a list of steps; the base side is shared, so each costs only its tuned side.")
    light_points: bool = Field(
        default=False, description="Scale and checkpoint entries measure only learning (the target held-out "
        "loss) and general text, the axes of `workbench compare`; the final adapters get the whole suite.")
    lm_eval: LmEval | None = Field(default=None, description="Named lm-evaluation-harness tasks on base and "
                                   "tuned (the lmeval extra); default none.")

    @model_validator(mode="after")
    def _check(self):
        if any(not 0.0 <= s <= 1.0 for s in self.scales):
            raise ValueError("scales must lie in [0, 1]")
        names = [task.name for task in self.multiple_choice]
        if len(set(names)) != len(names):
            raise ValueError(f"multiple-choice task names repeat: {names}")
        return self

    def bigbench_tasks(self) -> list[str]:
        """Every BIG-bench task the suite reads (multiple choice, target), each once: fetched in
        one pass over the 358 MB archive rather than one pass a task."""
        names = [task.bigbench for task in self.multiple_choice if task.bigbench]
        if self.target:
            names += [bigbench_task(s) for s in (self.target.heldout, self.target.train) if bigbench_task(s)]
        return list(dict.fromkeys(names))

    def base_fingerprint(self) -> str:
        """What the base side depends on: everything but the sweep and lm-eval."""
        return fingerprint(self.model_dump(exclude={"name", "description", "scales", "checkpoints", "light_points", "lm_eval"}))


def bigbench_task(source: str | None) -> str | None:
    """The task of a `bigbench:TASK[:SPLIT]` data source, else None."""
    return source.removeprefix("bigbench:").split(":")[0] if source and source.startswith("bigbench:") else None


def load_suite(path: str | Path) -> tuple[Suite, Path]:
    """The validated suite and its directory (for relative paths); bad input is one UsageError line."""
    path = Path(path)
    raw = read_yaml(path, kind="suite")
    try:
        suite = Suite(**raw)
    except ValidationError as exc:
        raise UsageError(f"{path}: {describe_error(exc, Suite)}") from None
    except TypeError:
        raise UsageError(f"{path}: a suite is a mapping of keys") from None
    return suite, path.parent
