"""Self-distillation's data side, on hand-written cases: the rewrite prompt, the stop tokens, which
rewrites are kept, and what a training record becomes."""

from __future__ import annotations

import json

import pytest

from workbench.config.recipe import DataSection
from workbench.config.self_distill import DEFAULT_TEMPLATE, SelfDistill
from workbench.data.examples import build_datasets
from workbench.data.gsm8k import gsm8k_record
from workbench.data.self_distill import (
    distilled, reference_answers, rewrite_prompt, rewrite_request, stop_ids, verdict
)
from workbench.errors import UsageError
from workbench.modeling.tiny import tiny_tokenizer

GSM8K = gsm8k_record({"question": "Tom has 3 bags of 6 apples. How many apples?",
                      "answer": "3 bags of 6 is 3*6=<<3*6=18>>18 apples.\n#### 18"})
WORD = {"prompt": "Q: The word nuirsse is a scrambled version of the English word\nA:", "completion": " sunrise"}
LONG = {"prompt": "Describe the sea.", "completion": "The sea is large, salty and mostly blue in daylight."}
NQ = {"prompt": "Q: who wrote hamlet?\nA:", "completion": " William Shakespeare",
      "answers": ["William Shakespeare", "Shakespeare"]}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_the_prompt_is_the_filled_template_as_a_user_turn_or_plain_text(tok):
    text = rewrite_request(DEFAULT_TEMPLATE, WORD)
    assert "### Task:\nQ: The word nuirsse is a scrambled version of the English word\nA:\n\n" in text
    assert "### Reference answer:\nsunrise\n\n### Your answer:\n" in text  # stripped of its leading space
    expected = "<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n"
    assert rewrite_prompt(tok, DEFAULT_TEMPLATE, WORD, "r") == tok(expected, add_special_tokens=False)["input_ids"]
    plain = tiny_tokenizer()
    plain.chat_template = None  # a base model's tokenizer: the text itself (no <bos> added: not Gemma's)
    assert rewrite_prompt(plain, DEFAULT_TEMPLATE, WORD, "r") == plain(text, add_special_tokens=False)["input_ids"]
    plain.add_bos_token = True  # Gemma: every sequence starts with <bos>
    assert rewrite_prompt(plain, DEFAULT_TEMPLATE, WORD, "r")[0] == plain.bos_token_id


def test_a_rewrite_stops_at_eos_and_at_the_end_of_a_chat_turn(tok):
    assert stop_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    plain = tiny_tokenizer()
    plain.chat_template = None
    assert stop_ids(plain) == [plain.eos_token_id]


def test_which_references_have_a_final_answer():
    assert reference_answers(GSM8K) == ("number", ["18"])
    assert reference_answers(WORD) == ("text", ["sunrise"])
    assert reference_answers(NQ) == ("text", ["William Shakespeare", "William Shakespeare", "Shakespeare"])
    assert reference_answers(LONG) is None  # 10 words of free text: nothing to read off
    assert reference_answers({"prompt": "p", "completion": "one two three four five"})[0] == "text"
    assert reference_answers({"prompt": "p", "completion": "one two three four five six"}) is None


@pytest.mark.parametrize("record, rewrite, finished, reason", [
    (GSM8K, "Each bag has 6, so 3 bags hold 18.\n#### 18", True, None),
    (GSM8K, "3 * 6 = 18 apples.\n#### 18.00", True, None),  # the same number, written otherwise
    (GSM8K, "3 + 6 = 9.\n#### 9", True, "wrong_answer"),
    (GSM8K, "There are 18 apples.", True, "wrong_answer"),  # no #### line: not the data's answer format
    (GSM8K, "Each bag has 6, so 3 bags hold 18.\n#### 18", False, "unfinished"),
    (WORD, "The unscrambled word is Sunrise.", True, None),  # case aside
    (WORD, "sunrises", True, "wrong_answer"),  # whole words only
    (WORD, "sun rise", True, "wrong_answer"),
    (WORD, "   \n", True, "empty"),
    (WORD, "As the reference answer says, sunrise.", True, "mentions_reference"),
    (NQ, "It was Shakespeare.", True, None),  # any listed answer
    (NQ, "William   Shakespeare wrote it", True, None),  # spacing aside
    (LONG, "Wide and grey.", True, None),  # no final answer: kept unchecked
])
def test_what_is_kept_and_why_not(record, rewrite, finished, reason):
    assert verdict(rewrite, finished, record, check_answer=True) == reason


def test_without_the_answer_check_a_wrong_answer_is_kept_but_an_unfinished_one_is_not():
    assert verdict("3 + 6 = 9.\n#### 9", True, GSM8K, check_answer=False) is None
    assert verdict("3 + 6 = 9.\n#### 9", False, GSM8K, check_answer=False) == "unfinished"


def test_a_kept_rewrite_becomes_the_completion_and_a_rejected_one_falls_back_or_drops():
    records = [WORD, GSM8K, LONG, NQ]
    rewrites = [("  sunrise, that is.\n", True), ("#### 19", True), ("Wide and grey.", False), ("Shakespeare", True)]
    out, counts = distilled(records, rewrites, SelfDistill())
    assert out[0] == {**WORD, "completion": " sunrise, that is."}  # the reference's leading space, then the text
    assert out[1] is GSM8K and out[2] is LONG
    assert out[3] == {**NQ, "completion": " Shakespeare"}
    assert counts == {"n_records": 4, "kept": 2, "dropped": 2, "with_answer": 3, "rejected": "original",
                      "dropped_by": {"unfinished": 1, "empty": 0, "mentions_reference": 0, "wrong_answer": 1}}
    dropped, _ = distilled(records, rewrites, SelfDistill(rejected="drop"))
    assert dropped[1] is None and dropped[2] is None and dropped[0] == out[0]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_the_rewrite_replaces_training_records_only_and_keeps_their_names(tok, tmp_path):
    records = [{"prompt": f"p{i}: ", "completion": f"c{i}"} for i in range(10)]
    data = DataSection(train=write_jsonl(tmp_path / "d.jsonl", records), val_fraction=0.2,
                       self_distill=SelfDistill())
    seen = {}

    def rewrite(train, names):
        seen["names"] = names
        return [None if r["completion"] == "c3" else {**r, "completion": r["completion"].upper()} for r in train]

    plain = build_datasets(data, tok, seed=0)
    out = build_datasets(data, tok, seed=0, rewrite=rewrite)
    assert out.val == plain.val  # validation keeps the references
    decoded = {tok.decode(ex["input_ids"]) for ex in out.train}
    kept = [r for r in records if f"{r['prompt']}{r['completion']}<|endoftext|>" in
            {tok.decode(ex["input_ids"]) for ex in plain.train}]
    assert decoded == {f"{r['prompt']}{r['completion'].upper()}<|endoftext|>" for r in kept if r["completion"] != "c3"}
    assert sorted(seen["names"]) == sorted(f"{data.train} record {int(r['completion'][1:]) + 1}" for r in kept)


def test_a_chat_record_is_refused_before_a_model_loads(tok, tmp_path):
    records = [{"prompt": "p: ", "completion": "c"},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    data = DataSection(train=write_jsonl(tmp_path / "d.jsonl", records), val_fraction=0.0,
                       self_distill=SelfDistill())
    with pytest.raises(UsageError, match=r"d.jsonl record 2: data.self_distill rewrites a completion"):
        build_datasets(data, tok, seed=0)
    build_datasets(data.model_copy(update={"self_distill": None}), tok, seed=0)  # the control: a chat is fine else
