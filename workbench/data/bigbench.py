"""Eval and training items from BIG-bench tasks, by default in the prompt format the survey
measured: the context is `"Q: {input}\nA:"` and each choice, or the generative target, follows
after one space (`shared/bigbench-smollm2-survey.md`). Multiple-choice items take another
context format on request (an eval suite's `prompt: chat`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from workbench.assets.bigbench import task_examples
from workbench.errors import UsageError


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: each choice is scored as `context + delimiter + choice`."""

    context: str
    choices: tuple[str, ...]
    gold: int
    doc_id: int  # the document's index in its source (BIG-bench examples, or the eval split)
    delimiter: str = " "  # lm-eval's target_delimiter


def bigbench_prompt(text: str) -> str:
    """The context every BIG-bench item is scored or trained after."""
    return f"Q: {text}\nA:"


def bigbench_mc(name: str, limit: int | None = None, prompt: Callable[[str], str] = bigbench_prompt,
                delimiter: str = " ") -> list[MCItem]:
    """The task's multiple-choice items (examples with `target_scores`), in file order.

    Choices keep the file's order; gold is the first choice with the highest score. Examples
    without target_scores are skipped and counted on stderr; `limit` caps the items returned.
    `prompt` turns an example's input into the context (default `Q: {input}\nA:`) and each
    choice is scored after `delimiter`.
    """
    items, skipped = [], 0
    for doc_id, example in enumerate(task_examples(name)):
        if limit is not None and len(items) >= limit:
            break
        scores = example.get("target_scores")
        if not scores:
            skipped += 1
            continue
        if not all(isinstance(s, (int, float)) for s in scores.values()):
            raise UsageError(f"bigbench task {name!r}: example {doc_id} has non-numeric target_scores")
        values = list(scores.values())
        gold = values.index(max(values))
        items.append(MCItem(prompt(example["input"]), tuple(scores), gold, doc_id, delimiter))
    if skipped:
        print(f"bigbench {name}: skipped {skipped} example(s) without target_scores", file=sys.stderr)
    if not items:
        raise UsageError(f"bigbench task {name!r} has no multiple-choice examples (no target_scores)")
    return items


def bigbench_generative(name: str, limit: int | None = None) -> list[dict]:
    """The task's examples with a target as prompt/completion records, in file order.

    {"prompt": "Q: {input}\\nA:", "completion": " " + target} (the first target when there are
    several). The completion starts with the space, as a choice does in `bigbench_mc`, so
    training on these and scoring multiple choice see the same boundary; the trainer appends eos.
    """
    records = []
    for example in task_examples(name):
        if limit is not None and len(records) >= limit:
            break
        target = example.get("target")
        if isinstance(target, list):
            target = target[0] if target else None
        if isinstance(target, str) and target:
            records.append({"prompt": bigbench_prompt(example["input"]), "completion": " " + target})
    if not records:
        raise UsageError(f"bigbench task {name!r} has no examples with a string target")
    return records
