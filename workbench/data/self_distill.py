"""Self-distillation's data side (`data.self_distill`): the prompt that asks the base to rewrite a
record's completion, and which rewrites are kept. No torch.

A rewrite is kept when it ended by itself (a stop token before max_new_tokens), says something,
does not talk about the reference instead of answering (SDFT's own filter bans such phrases), and,
under `check_answer`, reaches the reference's final answer where the reference has one:
- a completion with a GSM8K `#### N` line: the rewrite needs a `####` line with the same number
  (`gsm8k.final_answer`, strict), so it stays in the answer format the data teaches;
- a short completion (at most SHORT_ANSWER_WORDS words: a word_unscrambling word, an NQ-open
  answer, a reversed string) is its own final answer: the rewrite must contain it as whole words,
  case and spacing aside (any of the record's `answers` where it lists several);
- a longer completion without `####` is free text with no final answer to read off: its rewrite
  is kept unchecked, and counted as such.
"""

from __future__ import annotations

import re

from workbench.config.self_distill import SelfDistill
from workbench.data.examples import leading_bos, render_chat, text_ids
from workbench.data.gsm8k import final_answer

# Covers the study's short targets (one word to unscramble, NQ-open answers of 1-5 words); a longer
# reference is a sentence, and requiring it verbatim would refuse nearly every paraphrase.
SHORT_ANSWER_WORDS = 5
REASONS = ("unfinished", "empty", "mentions_reference", "wrong_answer")


def rewrite_request(template: str, record: dict) -> str:
    """The template with the record's prompt and reference completion, both stripped."""
    return template.replace("{prompt}", record["prompt"].strip()).replace("{reference}", record["completion"].strip())


def rewrite_prompt(tokenizer, template: str, record: dict, where: str) -> list[int]:
    """The ids the base continues: the request as a user turn in the chat template where the
    tokenizer has one (ending where the assistant's reply starts), else the plain text."""
    text = rewrite_request(template, record)
    if getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, [{"role": "user", "content": text}], where, generation_prompt=True)
    return leading_bos(tokenizer) + text_ids(tokenizer, text)


def stop_ids(tokenizer) -> list[int]:
    """eos, and under a chat template the special tokens that close an assistant turn (ChatML's
    <|im_end|> where eos is another token): a rewrite ends at its turn's end."""
    stops = [tokenizer.eos_token_id]
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": "x"}]
        before = render_chat(tokenizer, user, "chat template", generation_prompt=True)
        turn = render_chat(tokenizer, user + [{"role": "assistant", "content": "y"}], "chat template")[len(before):]
        specials = set(tokenizer.all_special_ids)
        stops += [t for t in dict.fromkeys(turn) if t in specials and t not in stops]
    return stops


def reference_answers(record: dict) -> tuple[str, list[str]] | None:
    """("number", [N]) for a completion with a `#### N` line, ("text", answers) for a short one,
    None for one with no final answer to check."""
    reference = record["completion"]
    number = final_answer(reference, strict=True)
    if number is not None:
        return "number", [number]
    if len(reference.split()) <= SHORT_ANSWER_WORDS and reference.strip():
        listed = record.get("answers")
        answers = listed if isinstance(listed, list) and all(isinstance(a, str) for a in listed) else []
        return "text", [reference.strip(), *(a.strip() for a in answers if a.strip())]
    return None


def _contains(text: str, answer: str) -> bool:
    words = r"\s+".join(re.escape(w) for w in answer.split())
    return re.search(rf"(?<!\w){words}(?!\w)", text, flags=re.IGNORECASE) is not None


def verdict(rewrite: str, finished: bool, record: dict, check_answer: bool) -> str | None:
    """None when the rewrite is kept, else the first reason it is not (one of REASONS)."""
    if not finished:
        return "unfinished"
    if not rewrite.strip():
        return "empty"
    if "reference answer" in rewrite.lower():
        return "mentions_reference"
    answers = reference_answers(record) if check_answer else None
    if answers is None:
        return None
    kind, expected = answers
    if kind == "number":
        return None if final_answer(rewrite, strict=True) == expected[0] else "wrong_answer"
    return None if any(_contains(rewrite, a) for a in expected) else "wrong_answer"


def distilled(records: list[dict], rewrites: list[tuple[str, bool]], cfg: SelfDistill
              ) -> tuple[list[dict | None], dict]:
    """Each record with its rewrite as the completion where kept; a rewrite not kept gives the record
    back (rejected: original) or None (rejected: drop). rewrites: (text, finished) per record.
    Returns the records and their counts for run.json."""
    out, reasons, with_answer = [], dict.fromkeys(REASONS, 0), 0
    for record, (text, finished) in zip(records, rewrites, strict=True):
        with_answer += reference_answers(record) is not None
        why = verdict(text, finished, record, cfg.check_answer)
        if why is None:  # the reference's leading space (` answer` after `A:`) is the data's boundary
            lead = record["completion"][:len(record["completion"]) - len(record["completion"].lstrip())]
            out.append({**record, "completion": lead + text.strip()})
        else:
            reasons[why] += 1
            out.append(record if cfg.rejected == "original" else None)
    dropped = sum(reasons.values())
    counts = {"n_records": len(records), "kept": len(records) - dropped, "dropped": dropped,
              "dropped_by": reasons, "with_answer": with_answer, "rejected": cfg.rejected}
    return out, counts
