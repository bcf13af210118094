"""GSM8K math word problems as training records, and the final answer of a worked solution.

A GSM8K solution is a few lines of reasoning with calculator annotations, ending in a line
`#### 18`. The annotations (`9 * 2 = $<<9*2=18>>18`) are instructions to the calculator the
paper's models called while sampling; a model without one would learn to write the result
twice, so they are removed, which also shortens the solutions by 14% of their characters.
The `####` line stays: it is where a generated answer is read from. No torch.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_CALCULATOR = re.compile(r"<<[^<>]*>>")
# A number as written in a solution: "18", "-3", "$1,234.50", ".5" (commas and $ are dropped).
_NUMBER = re.compile(r"-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_ANSWER_LINE = re.compile(r"####[ \t]*([^\n]*)")


def strip_calculator(solution: str) -> str:
    """The solution without its `<<expression=result>>` annotations."""
    return _CALCULATOR.sub("", solution)


def gsm8k_prompt(question: str) -> str:
    """The context a problem is trained and scored after (lm-evaluation-harness's gsm8k format);
    the solution follows after one space, as a BIG-bench target does."""
    return f"Question: {question}\nAnswer:"


def gsm8k_record(item: dict) -> dict:
    """An upstream {"question", "answer"} line as {"prompt", "completion", "final_answer"}."""
    completion = " " + strip_calculator(item["answer"])
    return {"prompt": gsm8k_prompt(item["question"]), "completion": completion,
            "final_answer": final_answer(completion, strict=True)}


def _canonical(number: str) -> str | None:
    """"$1,234.50" -> "1234.5", "18.00" -> "18", "-.5" -> "-0.5"; None if it is not a number."""
    try:
        value = Decimal(number.replace("$", "").replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def final_answer(text: str, strict: bool = False) -> str | None:
    """The final numeric answer of a solution or a generation, as a canonical string; None if none.

    The first number after the first `####` (a generation may run on into another question
    after its answer line, so later ones are not its answer). Without a `####` line, strict
    gives None and otherwise the last number in the text, as lm-evaluation-harness's
    "strict-match" and "flexible-extract" read gsm8k. Compare answers as these strings:
    "1,000", "$1000" and "1000.00" are all "1000".
    """
    line = _ANSWER_LINE.search(text)
    if line is not None:
        found = _NUMBER.search(line.group(1))
        if found is not None:
            return _canonical(found.group())
    if strict:
        return None
    numbers = _NUMBER.findall(text)
    return _canonical(numbers[-1]) if numbers else None
