"""The recipe schema of `data.self_distill`: the base rewrites each training completion in its own
words before training (docs/regularizers.md). No torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# After the template of SDFT (Yang et al. 2024, "Self-Distillation Bridges Distribution Gap in
# Language Model Fine-Tuning"): the task and its reference, and a request to answer in the model's
# own words keeping the reference's result. A chat model reads it as one user turn.
DEFAULT_TEMPLATE = (
    "Below is a task and a reference answer to it. Answer the task yourself, in your own words, guided "
    "by the reference and ending with the same final result, written the same way.\n\n"
    "### Task:\n{prompt}\n\n### Reference answer:\n{reference}\n\n### Your answer:\n")
PLACEHOLDERS = ("{prompt}", "{reference}")


class SelfDistill(BaseModel):
    """Self-distillation fine-tuning (SDFT): before training, the base (the same weights, no adapter)
    rewrites each training completion once from a prompt that shows it the reference; training then
    learns the rewrites, text close to the base's own distribution. Validation keeps the references."""

    model_config = ConfigDict(extra="forbid")

    template: str = Field(default=DEFAULT_TEMPLATE, description="The rewrite request; {prompt} and {reference} "
                          "are replaced by the record's prompt and completion (stripped)")
    max_new_tokens: int = Field(default=128, ge=1, description="a rewrite that has not ended by then is not kept")
    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy; above 0: sampled (top_k and top_p off)")
    seed: int = Field(default=0, description="the sampling seed at temperature > 0, apart from train.seed")
    check_answer: bool = Field(default=True, description="keep a rewrite only if it reaches the reference's final "
                               "answer, where the reference has one (GSM8K's `#### N`, or a reference of at most "
                               "5 words)")
    rejected: Literal["original", "drop"] = Field(
        default="original", description="what a rewrite that is not kept becomes: original (the reference "
        "completion, as SDFT does) or drop (the example leaves the training set)")

    @field_validator("template")
    @classmethod
    def _placeholders(cls, template: str) -> str:
        missing = [p for p in PLACEHOLDERS if p not in template]
        if missing:
            raise ValueError(f"data.self_distill.template needs {' and '.join(missing)}")
        return template
